"""Finds, loads and registers the oneDNN convolution library, once, on first use.

Nothing happens at ``import cnnjax``: the first convolution traced on the CPU calls `library()`,
which loads the installed libdnnl, then the library built at install time, and registers its
three handlers (forward, backward-data, backward-weights) as XLA FFI targets for the CPU platform. When that cannot work (switched off, another
OS or architecture, a failed build, missing wheel) `library()` returns None, cnnjax keeps XLA's
convolutions, and the reason is given once as a `KernelUnavailableWarning` (not when switched off).

Switch: ``CNNJAX_ONEDNN=0`` in the environment (read at that first use) never loads it;
``CNNJAX_ONEDNN=1`` uses it on any instruction set (by default only with AVX2 or AVX-512:
`cnnjax.kernels.active`); `cnnjax.kernels.use_onednn(False | True)` around tracing.
"""
from __future__ import annotations

import ctypes
import os
import threading
import warnings
from dataclasses import dataclass

from cnnjax.switches import env_choice
from cnnjax.kernels import build

TARGETS = {'forward': 'cnnjax_conv_forward', 'backward_data': 'cnnjax_conv_backward_data',
           'backward_weights': 'cnnjax_conv_backward_weights'}
PASSES = ('forward', 'backward_data', 'backward_weights')   # the library's Pass enum
ENV_SWITCH = 'CNNJAX_ONEDNN'
ABI = 2   # the handlers' operands and attributes, as cnnjax_conv_abi() in onednn_conv.cc says

# oneDNN's dnnl_cpu_isa_t values (dnnl_types.h) -> names.
_ISA_NAMES = {0x0: 'default', 0x1: 'sse41', 0x3: 'avx', 0x7: 'avx2', 0xf: 'avx2_vnni',
              0x1f: 'avx2_vnni_2', 0x27: 'avx512_core', 0x67: 'avx512_core_vnni',
              0xe7: 'avx512_core_bf16', 0x1ef: 'avx512_core_fp16', 0xfef: 'avx512_core_amx',
              0x1fef: 'avx512_core_amx_fp16'}


class KernelUnavailableWarning(UserWarning):
  """cnnjax's oneDNN convolutions cannot be used here; XLA's are used instead."""


class _Version(ctypes.Structure):
  _fields_ = [('major', ctypes.c_int), ('minor', ctypes.c_int), ('patch', ctypes.c_int),
              ('hash', ctypes.c_char_p), ('cpu_runtime', ctypes.c_uint),
              ('gpu_runtime', ctypes.c_uint)]


@dataclass(frozen=True)
class Library:
  """The loaded kernel library and the oneDNN it runs on."""
  path: str
  handle: ctypes.CDLL
  dnnl: ctypes.CDLL
  onednn_version: str
  isa: str
  bf16_native: bool  # oneDNN has bfloat16 convolutions on this CPU (else cnnjax uses float32)
  cpu_vendor: str    # /proc/cpuinfo's vendor_id: 'GenuineIntel', 'AuthenticAMD', ... or ''

  def last_impl(self, kind: str) -> str:
    """oneDNN's name of the implementation it chose last for a pass (e.g. 'brg_conv_fwd:...')."""
    fn = self.handle.cnnjax_conv_last_impl
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_int]
    return fn(PASSES.index(kind)).decode()


_lock = threading.Lock()
_state: dict = {}   # 'library': Library | None, 'reason': str | None; filled once


def env_switch() -> bool | None:
  """What ``CNNJAX_ONEDNN`` asks for: True (1/true/on/yes), False (0/false/off/no), or None
  (unset, empty or ``auto``: automatic). Any other value is a `ConfigError`: a typo must not
  silently run the other backend."""
  return env_choice(ENV_SWITCH, {**dict.fromkeys(('1', 'true', 'on', 'yes'), True),
                                 **dict.fromkeys(('0', 'false', 'off', 'no'), False),
                                 '': None, 'auto': None},
                    "1 (oneDNN convolutions), 0 (XLA's) or auto (unset: chosen by the CPU)")


def switched_off() -> bool:
  return env_switch() is False


def _load(library_path: str) -> Library:
  """Loads libdnnl and the kernel library and registers the FFI targets; raises OSError."""
  import jax  # only here: the loader is imported by cnnjax.layers, which must stay light

  dnnl = ctypes.CDLL(build.onednn_library(), mode=ctypes.RTLD_GLOBAL)
  handle = ctypes.CDLL(library_path)
  abi = handle.cnnjax_conv_abi()   # AttributeError when built before there was one
  if abi != ABI:
    raise AttributeError(f'its handlers take calling convention {abi}, cnnjax passes {ABI}')
  for name in TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, name)), platform='cpu')
  dnnl.dnnl_version.restype = ctypes.POINTER(_Version)
  v = dnnl.dnnl_version().contents
  dnnl.dnnl_get_effective_cpu_isa.restype = ctypes.c_int
  isa = dnnl.dnnl_get_effective_cpu_isa()
  return Library(library_path, handle, dnnl, f'{v.major}.{v.minor}.{v.patch}',
                 _ISA_NAMES.get(isa, hex(isa)), bool(handle.cnnjax_conv_bf16_native()),
                 _cpu_vendor())


def _cpu_vendor() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('vendor_id'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def _find() -> tuple[Library | None, str | None]:
  if switched_off():
    return None, f'switched off ({ENV_SWITCH}={os.environ[ENV_SWITCH]})'
  reason = build.supported_platform()
  if reason:
    return None, reason
  path = build.default_library_path()
  if not os.path.exists(path):
    err = build.error_file(path)
    if os.path.exists(err):
      with open(err) as f:
        return None, f'the library was not built at install: {f.read().strip()}'
    return None, (f'the library {os.path.basename(path)} is missing (build it with '
                  '`python -m cnnjax.kernels.build`, or reinstall cnnjax)')
  try:
    return _load(path), None
  except build.BuildError as e:
    return None, str(e)
  except OSError as e:
    return None, f'loading it failed: {e}'
  except AttributeError as e:  # built from an older onednn_conv.cc: a handler or ABI mismatch
    return None, (f'the library {path} is out of date ({e}): rebuild it with '
                  '`python -m cnnjax.kernels.build`')


def library(warn: bool = True) -> Library | None:
  """The loaded library, or None (the first call that finds none warns with the reason)."""
  with _lock:
    if 'library' not in _state:
      _state['library'], _state['reason'] = _find()
      _state['warned'] = False
    if (warn and _state['library'] is None and not _state['warned']
        and not _state['reason'].startswith('switched off')):
      _state['warned'] = True
      warnings.warn(f"cnnjax uses XLA's CPU convolutions, not oneDNN's: {_state['reason']}.",
                    KernelUnavailableWarning, stacklevel=3)
    return _state['library']


def forget() -> None:
  """Forgets the outcome of the first load, so the next `library()` looks again (after
  `cnnjax.kernels.build` has built the library in this process, e.g. in the tests)."""
  with _lock:
    _state.clear()


def unavailable_reason() -> str | None:
  """Why `library()` is None (None when it is loaded)."""
  library(warn=False)
  return _state['reason']
