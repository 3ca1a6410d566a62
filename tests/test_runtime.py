"""cnnjax.runtime: `import cnnjax` changes nothing; `configure_cpu()` opts in, user settings win."""
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from cnnjax import runtime

GLIBC = platform.libc_ver()[0] == 'glibc'
ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_OPTIONS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
                 'jax_persistent_cache_min_entry_size_bytes', 'jax_compilation_cache_max_size',
                 'jax_remove_custom_partitioning_ptr_from_cache_key')

PROBE = f"""
import json, os, sys, warnings
warnings.filterwarnings('error', message='cnnjax: ')  # e.g. 'JAX had already started a backend'
import jax
cache = lambda: {{name: getattr(jax.config, name) for name in {CACHE_OPTIONS!r}}}
out = {{'xla_flags_before': os.environ.get('XLA_FLAGS'), 'cache_before': cache()}}
import cnnjax
from cnnjax import runtime
out.update(xla_flags_imported=os.environ.get('XLA_FLAGS'), cache_imported=cache(),
           backend_started=runtime._backends_initialized())
out['first'], out['second'] = cnnjax.configure_cpu(), cnnjax.configure_cpu()
out.update(xla_flags=os.environ.get('XLA_FLAGS', ''), cache=cache(),
           cnnjax_flags=runtime.cpu_flags(), eval_options=runtime.eval_compiler_options())
print(json.dumps(out))
"""


def _probe(**env_changes):
  """Runs PROBE in a fresh process whose environment has no cnnjax, XLA or JAX cache settings."""
  ours = {'XLA_FLAGS', 'CNNJAX_CPU_FLAGS', 'CNNJAX_CACHE_DIR', *(n.upper() for n in CACHE_OPTIONS)}
  env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith('MALLOC_')}
  env.update(env_changes)
  proc = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_changes_nothing_and_configure_cpu_opts_in(tmp_path):
  root = tmp_path / 'cache'
  cache = root / f'kernels-{runtime._kernels_digest()}'   # one per version of the kernels
  cache.mkdir(parents=True)
  (cache / 'old-cache').write_bytes(b'x')  # an entry an unbounded cache wrote: no access time
  cache = str(cache)
  user = '--xla_force_host_platform_device_count=1'
  out = _probe(CNNJAX_CACHE_DIR=str(root), XLA_FLAGS=user)
  # `import cnnjax` leaves XLA_FLAGS, JAX's cache configuration and the backends alone.
  assert out['xla_flags_imported'] == out['xla_flags_before'] == user
  assert out['cache_imported'] == out['cache_before']
  assert out['cache_before']['jax_compilation_cache_dir'] is None
  assert not out['backend_started']  # so configure_cpu() right after the import is in time
  # configure_cpu(): the measured flags after the user's, once; a bounded cache.
  ours = [f'--{k}={v}' for k, v in out['cnnjax_flags'].items()]
  assert out['xla_flags'].split() == [user, *ours]
  malloc = {'M_ARENA_MAX': 1, 'M_MMAP_MAX': 0, 'M_TRIM_THRESHOLD': 2**31 - 1} if GLIBC else {}
  assert out['first'] == {'xla_flags': ours, 'cache_dir': cache, 'malloc': malloc}
  assert out['second'] == {'xla_flags': [], 'cache_dir': cache, 'malloc': {}}
  assert out['cache'] == {'jax_compilation_cache_dir': cache,
                          'jax_persistent_cache_min_compile_time_secs': 0.2,
                          'jax_persistent_cache_min_entry_size_bytes': -1,
                          'jax_compilation_cache_max_size': 2 * 2**30,
                          'jax_remove_custom_partitioning_ptr_from_cache_key': True}
  # ... whose eviction (jaxlib 0.10's) needs every entry's access-time file.
  assert os.path.getsize(os.path.join(cache, 'old-atime')) == 8


def test_user_settings_win(tmp_path):
  cache = str(tmp_path / 'cache')
  own_bound = _probe(CNNJAX_CACHE_DIR=cache, JAX_COMPILATION_CACHE_MAX_SIZE='12345')
  assert own_bound['cache']['jax_compilation_cache_max_size'] == 12345
  assert _probe(CNNJAX_CACHE_DIR=cache, MALLOC_ARENA_MAX='4')['first']['malloc'] == {}
  own_cache = _probe(JAX_COMPILATION_CACHE_DIR=cache)  # JAX's own setting: kept, not bounded
  assert own_cache['first']['cache_dir'] == cache
  assert own_cache['cache']['jax_compilation_cache_max_size'] == -1
  assert not own_cache['cache']['jax_remove_custom_partitioning_ptr_from_cache_key']
  for name in own_bound['cnnjax_flags']:  # a value the user chose for the same flag wins
    mine = f'--{name}=dot'
    users = _probe(CNNJAX_CACHE_DIR=cache, XLA_FLAGS=mine)
    assert users['xla_flags'] == mine
    assert users['eval_options'] is None  # ... and the eval step does not override it either


def test_opt_outs():
  out = _probe(CNNJAX_CACHE_DIR='', CNNJAX_CPU_FLAGS='0')
  assert out['xla_flags'] == '' and out['eval_options'] is None
  assert out['first'] == {'xla_flags': [], 'cache_dir': None, 'malloc': {}}
  assert out['cache'] == out['cache_before']


FAULTS = """
import ctypes, json, resource, sys, threading
if sys.argv[1] == 'keep':
  from cnnjax import runtime
  runtime.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def step():  # as XLA:CPU's worker threads allocate an execution's temporaries: one large block
  size = 256 * 2**20   # (with malloc: numpy would ask for huge pages)
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)   # written, so every page is touched
  libc.free(block)

faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  thread = threading.Thread(target=step)
  thread.start()
  thread.join()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


@pytest.mark.skipif(not GLIBC, reason='keep_freed_memory() sets glibc malloc options')
def test_kept_memory_is_not_page_faulted_in_again():
  """A 256 MB block allocated and freed by a thread, three times: glibc's default maps and
  unmaps it each time (65,536 4-KiB pages faulted in again); after keep_freed_memory() the
  second and third reuse the first's pages."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  faults = {}
  for mode in ('default', 'keep'):
    proc = subprocess.run([sys.executable, '-c', FAULTS, mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    faults[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  pages = 256 * 2**20 // os.sysconf('SC_PAGE_SIZE')
  assert max(faults['keep'][1:]) < pages // 20, faults
  if not _huge_pages_always():  # (with them, a fresh mapping faults in 2 MiB at a time)
    assert all(n > pages // 2 for n in faults['default']), faults


def _huge_pages_always() -> bool:
  try:
    return '[always]' in pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text()
  except OSError:
    return False


def test_flags_only_for_measured_jaxlib_versions(monkeypatch):
  measured = set(runtime._CPU_FLAGS)
  assert (0, 10) in measured and (0, 12) in measured
  assert set(runtime._EVAL_COMPILER_OPTIONS) <= measured
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setattr(runtime, '_jaxlib_version', lambda: (0, 99))  # a jaxlib nobody measured
  assert runtime.cpu_flags() == {} and runtime.eval_compiler_options() is None
  for version in measured:
    monkeypatch.setattr(runtime, '_jaxlib_version', lambda: version)
    assert runtime.cpu_flags() == runtime._CPU_FLAGS[version]
    assert runtime.eval_compiler_options() == runtime._EVAL_COMPILER_OPTIONS.get(version)


PARTITIONED = """
import sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import cnnjax
cnnjax.configure_cpu()
from cnnjax import kernels, layers
mesh = jax.make_mesh((2,), ('batch',))
def grad_of_conv(shape):
  conv = layers.Conv2d(16, 3, padding=1)
  x = jax.device_put(jnp.ones(shape), NamedSharding(mesh, P('batch')))
  params = conv.init(jax.random.key(0), x)
  jax.block_until_ready(jax.jit(jax.grad(lambda p, x: conv.apply(p, x).sum()))(params, x))
if sys.argv[1] == 'other program first':   # its callbacks take the first places in JAX's registry
  grad_of_conv((2, 6, 6, 16))
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
grad_of_conv((4, 8, 8, 16))
print(kernels.active(), events.count('/jax/compilation_cache/cache_hits'),
      events.count('/jax/compilation_cache/cache_misses'))
"""


def test_a_program_partitioned_over_devices_is_found_in_the_cache_by_the_next_process(tmp_path):
  """The oneDNN convolutions' partitioning callbacks are not in the cache key: with their place in
  JAX's callback registry in it, a process that had partitioned another program first (as the
  suite's children, a notebook) never found the program."""
  env = {k: v for k, v in os.environ.items()
         if k not in {'XLA_FLAGS', 'CNNJAX_CACHE_DIR', *(n.upper() for n in CACHE_OPTIONS)}}
  env.update(CNNJAX_CACHE_DIR=str(tmp_path), XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')   # write every program, however small
  runs = [subprocess.run([sys.executable, '-c', PARTITIONED, first], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=300) for first in ('', 'other program first')]
  assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
  (active, *first), (_, *second) = (r.stdout.split()[-3:] for r in runs)
  if active != 'True':
    pytest.skip('the oneDNN convolutions are not available here')
  # the first process wrote its programs; the second found them all (with the callbacks in the
  # key: 4 hits and 1 miss, the gradient's program)
  assert int(first[1]) > 0 and int(second[0]) > 0 and second[1] == '0', (first, second)
