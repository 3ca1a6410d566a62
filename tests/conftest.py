"""Shared test setup: small, CPU-only, one device (multi-device tests start their own process).

The suite opts in to cnnjax's CPU configuration as run.py does (XLA:CPU flags, the compilation
cache); the processes tests start inherit XLA_FLAGS, and get the same cache through JAX's
environment variables.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from cnnjax import runtime  # noqa: E402

if runtime.configure_cpu()['cache_dir']:
  import jax
  for _name in ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
                'jax_persistent_cache_min_entry_size_bytes', 'jax_compilation_cache_max_size'):
    os.environ.setdefault(_name.upper(), str(getattr(jax.config, _name)))


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject's addopts): one worker per core, at most 4. Test files run whole on one
  worker (`--dist loadscope`: their module fixtures start one child process each, some with 8
  simulated devices and a few GB); `-n 0` runs everything in this process."""
  del config
  return max(1, min(len(os.sched_getaffinity(0)), 4))
