"""Shared test setup: small, CPU-only, one device (multi-device tests start their own process)."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
