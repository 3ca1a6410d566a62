"""Process-wide JAX set-up that must happen before JAX starts: CPU XLA flags and the compile cache.

`configure_cpu()` is called by ``import cnnjax``. It does two things:

1. Appends XLA flags that make XLA:CPU train CNNs faster to ``XLA_FLAGS`` (read by XLA when the
   first backend starts, not at ``import jax``). Only ``xla_cpu_*`` flags are set, so GPU and TPU
   compilation is untouched. A flag the user already put in ``XLA_FLAGS`` is never overridden, and
   flags are only added for jaxlib versions on which they were measured (XLA aborts the process on
   a flag it does not know). ``CNNJAX_CPU_FLAGS=0`` turns this off.
2. Enables JAX's persistent compilation cache in a user cache directory
   (``~/.cache/cnnjax/jax_cache``, or ``$XDG_CACHE_HOME/cnnjax/jax_cache``), with thresholds low
   enough that CPU compilations are written too. ``CNNJAX_CACHE_DIR=<dir>`` moves it,
   ``CNNJAX_CACHE_DIR=`` (empty) disables it. A cache directory the user configured for JAX
   (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) wins.

Why these flags (measured on a 2-core AVX-512 CPU, jaxlib 0.10.2; numbers in benchmarks/README.md):
by default jaxlib 0.10 sends convolutions to YNNPACK, which is slower than XLA's own (Eigen)
convolutions on every pass here (weight gradients 2-3x slower). Removing convolutions from the
YNNPACK list, while keeping its dot and reduction fusions (batch-norm statistics), made a
small_resnet train step 1.3-1.5x faster; sending only dots to YNNPACK (``=dot``) loses the
reductions and is slower.
"""
from __future__ import annotations

import os
import sys
import warnings

# Flags per jaxlib (major, minor) they were measured on. Keys are flag names without '--'.
_CPU_FLAGS: dict[tuple[int, int], dict[str, str]] = {
    # Keep jaxlib's default YNNPACK fusions (dots, reductions) but give convolutions to Eigen.
    (0, 10): {'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution'},
}

# Per-compilation options for evaluation steps, per jaxlib (same gating as _CPU_FLAGS). Training
# needs YNNPACK's reduction fusions (batch-norm statistics); a forward pass with frozen
# statistics is faster without them: only dots go to YNNPACK.
_EVAL_COMPILER_OPTIONS: dict[tuple[int, int], dict[str, str]] = {
    (0, 10): {'xla_cpu_experimental_ynn_fusion_type':
              'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT'},
}

_CACHE_MIN_COMPILE_TIME_SECS = 0.2   # JAX's default (1 s) skips most CPU compilations of tests.
_CACHE_MIN_ENTRY_SIZE_BYTES = -1     # -1: no size limit (and JAX may not raise it later).

_configured = False


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

  On jaxlib 0.10, YNNPACK's reduction fusions (which speed up batch-norm statistics in a train
  step) slow down a ResNet's forward pass with frozen statistics; leaving them out of the eval
  step made cifar_resnet18's eval 1.3x faster (benchmarks/README.md). Only for the CPU:
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
  """Turns on JAX's persistent compilation cache; returns the directory used (None: disabled).

  Args:
    cache_dir: where to keep compiled executables; None means `default_cache_dir()`, '' disables.
      A directory the user already gave JAX (``JAX_COMPILATION_CACHE_DIR``) is kept.
  """
  import jax
  existing = getattr(jax.config, 'jax_compilation_cache_dir', None)
  if existing:
    return existing
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  if not cache_dir:
    return None
  cache_dir = os.path.expanduser(cache_dir)
  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as e:  # a read-only home must not break `import cnnjax`.
    warnings.warn(f'cnnjax: cannot create the compilation cache {cache_dir!r} ({e}); '
                  'compiling without it.', stacklevel=2)
    return None
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', _CACHE_MIN_COMPILE_TIME_SECS)
  if 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES' not in os.environ:
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', _CACHE_MIN_ENTRY_SIZE_BYTES)
  return cache_dir


def configure_cpu() -> None:
  """Sets cnnjax's XLA:CPU flags and enables the compilation cache; idempotent.

  Call it before JAX starts a backend (``import cnnjax`` does). Called later it still enables
  the cache but warns that the XLA flags come too late.
  """
  global _configured
  if _configured:
    return
  _configured = True
  set_xla_flags()
  enable_compilation_cache()
