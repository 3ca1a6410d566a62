"""Shared test setup: small, CPU-only, one device (multi-device tests start their own process).

The suite opts in to cnnjax's CPU configuration as run.py does (XLA:CPU flags, the compilation
cache); the processes tests start inherit XLA_FLAGS, and get the same cache through JAX's
environment variables.

The cache is `runtime.enable_compilation_cache`'s (a subdirectory per version of
cnnjax/kernels/*.py, partitioned programs found again); the children get its settings too.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from cnnjax import runtime  # noqa: E402


if runtime.configure_cpu()['cache_dir']:
  import jax
  for _name in ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
                'jax_persistent_cache_min_entry_size_bytes', 'jax_compilation_cache_max_size',
                'jax_remove_custom_partitioning_ptr_from_cache_key'):
    os.environ.setdefault(_name.upper(), str(getattr(jax.config, _name)))


# The files that take longest (end-to-end runs in child processes), longest first. The workers
# take files in collection order (pyproject: --no-loadscope-reorder, which would otherwise start
# with the files of most tests), so these start first and the short files fill in around them;
# a long file left for last would run alone on one core at the end. Only the order changes.
LONGEST_FIRST = ('test_experiments.py', 'test_stream_resume.py', 'test_streaming.py',
                 'test_torchvision_parity.py', 'test_disk_full.py', 'test_multihost.py',
                 'test_export.py', 'test_zoo.py', 'test_checkpoint.py', 'test_notebook.py',
                 'test_run.py', 'test_benchmark_smoke.py')


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject's addopts): one worker per core, at most 4. Test files run whole on one
  worker (`--dist loadscope`: their module fixtures start one child process each, some with 8
  simulated devices and a few GB); `-n 0` runs everything in this process."""
  del config
  return max(1, min(len(os.sched_getaffinity(0)), 4))
