"""CPU kernels called through ``jax.ffi``: oneDNN's convolutions (float32 and bfloat16).

`cnnjax.layers.Conv2d` computes its convolutions with `conv2d` on the CPU when the library
loads (see `cnnjax.kernels.loader`) and the CPU has AVX2 or AVX-512 (where oneDNN was measured
faster), and with XLA's ``lax.conv_general_dilated`` otherwise: on other backends, platforms, after
a failed build, on older instruction sets unless ``CNNJAX_ONEDNN=1``, or when switched off with
``CNNJAX_ONEDNN=0`` or `use_onednn(False)`. `backend()` says which is active, why, and on which instruction set.

* ``onednn_conv.cc``: the C++ FFI handlers (forward, backward-data, backward-weights);
* ``winograd.h``: Winograd F(4x4, 3x3) for float32 3x3 stride-1 convolutions (all three passes),
  which the handlers use where it fits on AVX2 and AVX-512 CPUs (`use_winograd` decides
  otherwise);
* ``build.py``: compiles it (at ``pip install``, or ``python -m cnnjax.kernels.build``);
* ``loader.py``: loads and registers it on first use, and says once why it cannot;
* ``conv.py`` / ``partition.py``: the custom-VJP JAX function and its batch partitioning.
"""
from __future__ import annotations

from cnnjax.kernels import loader
from cnnjax.kernels.loader import ENV_SWITCH, KernelUnavailableWarning, library, unavailable_reason
from cnnjax.switches import TraceSwitch

_USE_ONEDNN = TraceSwitch('use_onednn')   # None: automatic

# Where oneDNN's convolutions are used without being asked for: the instruction sets on which they
# were measured faster than XLA's over whole train steps (AVX2: small_resnet and cifar_resnet18
# 1.21-1.25x, benchmarks/README.md; AVX-512: 1.37-1.57x on an AVX512-FP16 Xeon). Older
# ones (SSE4.1, AVX) were not measured; CNNJAX_ONEDNN=1 or use_onednn(True) uses them anyway.
_AUTOMATIC_ISAS = ('avx2', 'avx512')


def use_onednn(enabled: bool | None):
  """Turns the oneDNN convolutions on or off (None: automatic) for the convolutions traced inside."""
  return _USE_ONEDNN(enabled)


def _choice(lib) -> tuple[bool, str | None]:
  """(use oneDNN?, why not) for a loaded library."""
  asked = _USE_ONEDNN.get()
  if asked is not None:
    return asked, None if asked else 'switched off by use_onednn(False)'
  if loader.env_switch():
    return True, None
  if lib.isa.startswith(_AUTOMATIC_ISAS):
    return True, None
  return False, (f'oneDNN is used by default only with AVX2 or AVX-512 (this CPU: {lib.isa}); '
                 f'{ENV_SWITCH}=1 uses it')


def active() -> bool:
  """Whether a convolution traced now runs on oneDNN: on the CPU backend, outside
  ``cnnjax.fast_paths.cpu_fast_paths(False)`` (exports and summaries trace plain convolutions),
  when the library loads (the first call loads it; if it cannot, warns once with the reason)
  and `use_onednn` / ``CNNJAX_ONEDNN`` / the CPU say so."""
  from cnnjax import fast_paths
  if not fast_paths.active():   # also False off the CPU backend
    return False
  lib = library()
  return lib is not None and _choice(lib)[0]


def backend() -> dict:
  """Which convolution backend is active here, and why: ``{'conv': 'onednn' | 'xla', ...}``
  with oneDNN's version, the instruction set it dispatches to and the library path, or the reason
  it is not used."""
  import jax
  lib = library(warn=False)
  if jax.default_backend() != 'cpu':
    return {'conv': 'xla', 'reason': f'the default backend is {jax.default_backend()}'}
  if lib is None:
    return {'conv': 'xla', 'reason': unavailable_reason()}
  use, reason = _choice(lib)
  from cnnjax.kernels.conv import bfloat16_arithmetic, winograd_wanted
  bf16, why = bfloat16_arithmetic(lib)
  info = {'conv': 'onednn' if use else 'xla', 'onednn': lib.onednn_version,
          'isa': lib.isa, 'bfloat16': 'native' if bf16 == 'native' else 'computed in float32',
          'bfloat16_why': why,
          'winograd': 'float32 3x3 stride 1' if use and winograd_wanted(lib) else 'off',
          'library': lib.path}
  if reason:
    info['reason'] = reason
  for kind in loader.PASSES:
    if lib.last_impl(kind):
      info[f'last_{kind}'] = lib.last_impl(kind)
  return info


def use_winograd(enabled: bool | None):
  """``with use_winograd(False):`` keeps the convolutions traced inside on oneDNN's direct
  kernels instead of Winograd F(4x4, 3x3); True uses it also where it is not automatic
  (instruction sets older than AVX2), None chooses by the CPU (`cnnjax.kernels.conv.use_winograd`)."""
  from cnnjax.kernels.conv import use_winograd as impl
  return impl(enabled)


def use_bfloat16_arithmetic(mode: str | None):
  """``with use_bfloat16_arithmetic('native' | 'float32'):`` computes the bfloat16 convolutions
  traced inside on oneDNN's bfloat16 kernels or on their values in float32; None chooses as
  ``CNNJAX_BFLOAT16_CONV`` or the CPU says (`cnnjax.kernels.conv.bfloat16_arithmetic`)."""
  from cnnjax.kernels.conv import use_bfloat16_arithmetic as impl
  return impl(mode)


def check_environment() -> None:
  """Raises a `ConfigError` now if ``CNNJAX_ONEDNN`` or ``CNNJAX_BFLOAT16_CONV`` holds no setting.

  They are read when the first convolution is traced, after the data has loaded; ``run.py``
  calls this first so that a typo stops a run before it starts.
  """
  loader.env_switch()
  from cnnjax.kernels.conv import env_bfloat16_arithmetic
  env_bfloat16_arithmetic()


def conv2d(*args, **kwargs):
  """oneDNN's convolution (`cnnjax.kernels.conv.conv2d`); call it only when `active()`."""
  from cnnjax.kernels.conv import conv2d as impl
  return impl(*args, **kwargs)


def supports(*args, **kwargs) -> bool:
  """Whether `conv2d` computes a convolution of these operands (`cnnjax.kernels.conv.supports`)."""
  from cnnjax.kernels.conv import supports as impl
  return impl(*args, **kwargs)


__all__ = ['ENV_SWITCH', 'KernelUnavailableWarning', 'active', 'backend', 'check_environment',
           'conv2d', 'supports',
           'use_bfloat16_arithmetic', 'use_onednn', 'use_winograd']
