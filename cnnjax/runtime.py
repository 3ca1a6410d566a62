"""Opt-in JAX set-up for the CPU: XLA:CPU flags, a bounded compilation cache, malloc that keeps memory.

``import cnnjax`` configures nothing. `configure_cpu()` (also ``cnnjax.configure_cpu``) changes
process-wide state, so it is an explicit call: ``run.py`` makes it before JAX starts a backend,
and library or notebook users make it right after ``import cnnjax``, before their first JAX
computation::

    import cnnjax
    cnnjax.configure_cpu()

It does three things:

1. Appends XLA flags that make XLA:CPU train CNNs faster to ``XLA_FLAGS`` (read by XLA when the
   first backend starts, not at ``import jax``). Only ``xla_cpu_*`` flags are set, so GPU and TPU
   compilation is untouched. A flag the user already put in ``XLA_FLAGS`` is never overridden, and
   flags are only added for jaxlib versions on which they were measured to help (XLA aborts the
   process on a flag it does not know; an unknown jaxlib gets none). ``CNNJAX_CPU_FLAGS=0`` turns
   this off.
2. Enables JAX's persistent compilation cache in a user cache directory
   (``~/.cache/cnnjax/jax_cache``, or ``$XDG_CACHE_HOME/cnnjax/jax_cache``), with thresholds low
   enough that CPU compilations are written too, bounded to 2 GiB (JAX evicts the least recently
   used entries beyond ``jax_compilation_cache_max_size``; ``JAX_COMPILATION_CACHE_MAX_SIZE``
   sets another bound). ``CNNJAX_CACHE_DIR=<dir>`` moves it, ``CNNJAX_CACHE_DIR=`` (empty)
   disables it. A cache the user configured for JAX (``JAX_COMPILATION_CACHE_DIR`` or
   ``jax.config``) is left as it is.

   Entries live in a subdirectory ``kernels-<hash of cnnjax/kernels/*.py>``, because the cache
   key then leaves out the oneDNN convolutions' partitioning callbacks
   (``jax_remove_custom_partitioning_ptr_from_cache_key``): with their place in JAX's callback
   registry in the key, a process that had partitioned another program first never found a
   program that `jax.jit` partitioned over several devices, and compiled it again (the suite's
   8-device child running 4 jit trainings: 60 s -> 24 s without them in the key). The hash
   stands in for the partitioning rules the key no longer holds: editing cnnjax's kernels starts
   a new subdirectory instead of reusing programs partitioned by the old rules.
3. On Linux with glibc, makes malloc keep the memory the process frees for reuse
   (`keep_freed_memory`): XLA:CPU allocates all temporaries of an execution as one block (733 MB
   for small_resnet's train step at batch 128) from a worker thread, and glibc maps a block that
   large afresh and unmaps it when freed, so every step page-faulted all of it in again: 0.3 s
   of kernel time per 1.1 s step on 2 cores. Kept, ResNet train steps ran 1.2x faster
   (benchmarks/README.md). The process's memory then stays at its peak instead of shrinking.
   ``MALLOC_*`` variables or ``glibc.malloc`` tunables the user set win; ``CNNJAX_CPU_FLAGS=0``
   turns this off too.

Separately, `eval_compiler_options()` gives per-compilation options for cnnjax's own evaluation
steps (``train.jit_eval_step``, ``parallel``); they change nothing else in the process.

Why these flags (measured on 2-core AVX-512 CPUs; the tables and commands are in
benchmarks/README.md): by default jaxlib 0.10 and 0.12 send convolutions to YNNPACK, which is
slower than XLA's own (Eigen) convolutions on every pass here, weight gradients most.
Removing convolutions from the YNNPACK list, while keeping its dot and reduction fusions
(batch-norm statistics), makes ResNet train steps faster; sending only dots to YNNPACK (``=dot``)
loses the reductions and is slower for training, faster for evaluation.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import pathlib
import platform
import sys
import warnings

# Flags per jaxlib (major, minor) on which they were measured to help (benchmarks/README.md has
# the tables and commands); any other jaxlib gets none. Keys are flag names without '--'.
# Both versions' default YNNPACK fusions are dots, individual dots, reductions and individual
# convolutions: keep the first three (batch-norm statistics need the reductions), give
# convolutions to XLA's Eigen kernels.
_TRAIN_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution'}
_CPU_FLAGS: dict[tuple[int, int], dict[str, str]] = {(0, 10): _TRAIN_FLAGS, (0, 12): _TRAIN_FLAGS}

# Per-compilation options for evaluation steps, per jaxlib (measured like _CPU_FLAGS). Training
# needs YNNPACK's reduction fusions (batch-norm statistics); a forward pass with frozen
# statistics is faster without them: only dots go to YNNPACK. (Set process-wide, this slows
# training down, so it is per compilation.)
_EVAL_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT'}
_EVAL_COMPILER_OPTIONS: dict[tuple[int, int], dict[str, str]] = {
    (0, 10): _EVAL_OPTIONS, (0, 12): _EVAL_OPTIONS}

_CACHE_MIN_COMPILE_TIME_SECS = 0.2   # JAX's default (1 s) skips most CPU compilations of tests.
_CACHE_MIN_ENTRY_SIZE_BYTES = -1     # -1: no minimum size (and JAX may not raise it later).
_CACHE_MAX_SIZE_BYTES = 2 * 2**30    # least recently used entries are evicted beyond this.


def default_cache_dir() -> str:
  """``$CNNJAX_CACHE_DIR`` if set (empty means disabled), else ``<user cache>/cnnjax/jax_cache``."""
  if 'CNNJAX_CACHE_DIR' in os.environ:
    return os.environ['CNNJAX_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'cnnjax', 'jax_cache')


def _jaxlib_version() -> tuple[int, int] | None:
  try:
    from importlib.metadata import version
    major, minor = version('jaxlib').split('.')[:2]
    return int(major), int(minor)
  except Exception:  # not installed, or an unusual version string: add no flags.
    return None


def _flag_names(xla_flags: str) -> set[str]:
  return {f.lstrip('-').split('=', 1)[0] for f in xla_flags.split() if f.startswith('--')}


def _backends_initialized() -> bool:
  jax = sys.modules.get('jax')
  if jax is None:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:
    return False


def cpu_flags() -> dict[str, str]:
  """The XLA:CPU flags cnnjax adds for the installed jaxlib (empty if it was not measured)."""
  return dict(_CPU_FLAGS.get(_jaxlib_version(), {}))


def _cpu_flags_disabled() -> bool:
  return os.environ.get('CNNJAX_CPU_FLAGS', '1').strip().lower() in ('0', 'false', 'no', 'off')


_ACCELERATOR_PLUGINS = ('libtpu', 'jax-cuda', 'jax_cuda', 'jax-rocm', 'jax_rocm')


def _cpu_is_the_default_backend() -> bool:
  """Whether JAX will compute on the CPU, known without starting a backend: JAX_PLATFORMS says
  so, or no accelerator plugin (libtpu, jax-cuda*, jax-rocm*) is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  from importlib import metadata
  names = (dist.metadata.get('Name', '') or '' for dist in metadata.distributions())
  return not any(name.lower().startswith(_ACCELERATOR_PLUGINS) for name in names)


def eval_compiler_options(platform: str | None = None) -> dict[str, str] | None:
  """``compiler_options`` for jit-compiling evaluation steps (None: compile as usual).

  On jaxlib 0.10 and 0.12, YNNPACK's reduction fusions (which speed up batch-norm statistics in
  a train step) slow down a forward pass with frozen statistics, so eval steps leave them out
  (measured in benchmarks/README.md; other jaxlibs: None). Only for the CPU:
  ``platform`` is the devices' platform when known, else it is inferred without starting JAX.
  None when ``CNNJAX_CPU_FLAGS=0`` or the user set YNNPACK fusions in ``XLA_FLAGS`` themselves.
  """
  options = _EVAL_COMPILER_OPTIONS.get(_jaxlib_version())
  if not options or _cpu_flags_disabled():
    return None
  if platform != 'cpu' and (platform is not None or not _cpu_is_the_default_backend()):
    return None
  ours = {f'--{name}={value}' for name, value in cpu_flags().items()}
  users = [f for f in os.environ.get('XLA_FLAGS', '').split() if f not in ours]
  if set(options) & _flag_names(' '.join(users)):
    return None
  return dict(options)


def set_xla_flags() -> list[str]:
  """Appends cnnjax's CPU flags to ``XLA_FLAGS`` unless present; returns the flags it added."""
  if _cpu_flags_disabled():
    return []
  current = os.environ.get('XLA_FLAGS', '')
  present = _flag_names(current)
  added = [f'--{name}={value}' for name, value in cpu_flags().items() if name not in present]
  if not added:
    return []
  if _backends_initialized():
    warnings.warn('cnnjax: JAX had already started a backend, so its CPU XLA flags '
                  f'({" ".join(added)}) will not take effect; import cnnjax before using JAX.',
                  stacklevel=3)
    return []
  os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache, bounded; returns its directory (None: off).

  Args:
    cache_dir: where to keep compiled executables; None means `default_cache_dir()`, '' disables.
      A directory the user already gave JAX (``JAX_COMPILATION_CACHE_DIR``) is kept, with the
      user's own settings.
  """
  import jax
  existing = getattr(jax.config, 'jax_compilation_cache_dir', None)
  if existing:
    return existing
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  if not cache_dir:
    return None
  cache_dir = os.path.join(os.path.expanduser(cache_dir), f'kernels-{_kernels_digest()}')
  if importlib.util.find_spec('filelock') is None:  # JAX needs it to bound (evict from) a cache
    warnings.warn('cnnjax: the compilation cache needs the filelock package to stay bounded; '
                  'compiling without it (pip install filelock).', stacklevel=2)
    return None
  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as e:  # a read-only home must not break configure_cpu().
    warnings.warn(f'cnnjax: cannot create the compilation cache {cache_dir!r} ({e}); '
                  'compiling without it.', stacklevel=2)
    return None
  _give_entries_an_access_time(cache_dir)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  for name, value in (('jax_persistent_cache_min_compile_time_secs', _CACHE_MIN_COMPILE_TIME_SECS),
                      ('jax_persistent_cache_min_entry_size_bytes', _CACHE_MIN_ENTRY_SIZE_BYTES),
                      ('jax_compilation_cache_max_size', _CACHE_MAX_SIZE_BYTES),
                      ('jax_remove_custom_partitioning_ptr_from_cache_key', True)):
    if name.upper() not in os.environ:  # a value the user set in the environment wins
      jax.config.update(name, value)
  return cache_dir


def _kernels_digest() -> str:
  """12 hex digits of a hash of cnnjax/kernels/*.py (the convolutions' partitioning rules)."""
  kernels = pathlib.Path(__file__).resolve().parent / 'kernels'
  digest = hashlib.sha256(b''.join(p.read_bytes() for p in sorted(kernels.glob('*.py'))))
  return digest.hexdigest()[:12]


def _give_entries_an_access_time(cache_dir: str) -> None:
  """Gives entries written by an unbounded cache the access-time file a bounded one keeps.

  JAX's bounded cache stores ``<key>-atime`` beside each ``<key>-cache``; jaxlib 0.10's eviction
  fails every write while one is missing (e.g. entries from an unbounded cache in the same
  directory, as cnnjax 0.1 wrote); 0.12 takes them as least recently used. Their modification
  time stands in.
  """
  try:
    names = set(os.listdir(cache_dir))
  except OSError:
    return
  for name in names:
    key = name[:-len('-cache')]
    if name.endswith('-cache') and f'{key}-atime' not in names:
      path = os.path.join(cache_dir, name)
      try:
        with open(os.path.join(cache_dir, f'{key}-atime'), 'wb') as f:
          f.write(os.stat(path).st_mtime_ns.to_bytes(8, 'little'))
      except OSError:
        pass


# glibc's mallopt parameters (malloc.h): one arena for all threads (a block of a thread's own
# arena larger than its 64 MB heap is always mapped afresh), no mmap, never trim the heap's top.
_MALLOC_SETTINGS = {'M_ARENA_MAX': (-8, 1), 'M_MMAP_MAX': (-4, 0),
                    'M_TRIM_THRESHOLD': (-1, 2**31 - 1)}
_malloc_kept: list[dict] = []   # what keep_freed_memory() set, once


def keep_freed_memory() -> dict[str, int]:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system
  (module docstring, 3.); returns the ``mallopt`` settings made by this call ({} when nothing
  was set: not glibc, ``CNNJAX_CPU_FLAGS=0``, the user's own ``MALLOC_*`` settings or allocator
  in ``LD_PRELOAD``, or set already). Earlier allocations keep their place: call it early."""
  if (_malloc_kept or _cpu_flags_disabled() or platform.libc_ver()[0] != 'glibc'
      or any(k.startswith('MALLOC_') for k in os.environ)
      or 'malloc' in os.environ.get('LD_PRELOAD', '')   # another allocator (jemalloc, tcmalloc)
      or 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', '')):
    return {}
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  kept = {name: value for name, (param, value) in _MALLOC_SETTINGS.items()
          if mallopt(param, value) == 1}
  _malloc_kept.append(kept)
  return kept


def configure_cpu() -> dict:
  """Sets cnnjax's XLA:CPU flags, enables the bounded compilation cache and makes malloc keep
  freed memory (module docstring); idempotent.

  Call it before JAX starts a backend (right after ``import cnnjax``; ``run.py`` does). Called
  later it still enables the cache but warns that the XLA flags come too late. Returns
  ``{'xla_flags': [the flags this call added], 'cache_dir': the cache directory or None,
  'malloc': {the mallopt settings this call made}}``.
  """
  malloc = keep_freed_memory()   # first: what is allocated before it keeps its place
  return {'xla_flags': set_xla_flags(), 'cache_dir': enable_compilation_cache(), 'malloc': malloc}
