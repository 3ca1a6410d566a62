"""Compiles the oneDNN convolution library (onednn_conv.cc) with the system's C++ compiler.

Needs no JAX import, so that ``setup.py`` can call it while pip builds cnnjax: the XLA FFI headers
come from the installed ``jaxlib`` (``jaxlib/include``), oneDNN's headers from the
``onednn-devel-cpu-gomp`` wheel and its library from ``onednn-cpu-gomp`` (oneDNN 3.2 built with
GNU OpenMP; the newer ``onednn`` wheels are SYCL builds that cannot create a CPU engine). The
library links libdnnl by its soname only; `cnnjax.kernels.loader` loads the installed libdnnl
first, so the build environment's copy is never needed at run time.

``python -m cnnjax.kernels.build`` rebuilds it in place (next to this file).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onednn_conv.cc')
LIBRARY_STEM = '_onednn_conv'
ONEDNN_RUNTIME = 'onednn-cpu-gomp'
ONEDNN_DEVEL = 'onednn-devel-cpu-gomp'


class BuildError(Exception):
  """The library cannot be built here; the message says why in one sentence."""


def library_name() -> str:
  """File name of the library: tagged like a Python extension (it depends on the platform)."""
  return LIBRARY_STEM + (sysconfig.get_config_var('EXT_SUFFIX') or '.so')


def default_library_path() -> str:
  return os.path.join(os.path.dirname(SOURCE), library_name())


def error_file(library_path: str) -> str:
  """Where a failed build leaves its reason (the loader repeats it once, on first use)."""
  return os.path.splitext(library_path)[0] + '.build-error.txt'


def supported_platform() -> str | None:
  """None on Linux x86_64 (where the oneDNN wheels exist), else the reason."""
  if sys.platform != 'linux' or platform.machine() not in ('x86_64', 'AMD64'):
    return (f'the oneDNN wheels exist for Linux x86_64 only (this is {sys.platform} '
            f'{platform.machine()})')
  return None


def _wheel_file(dist: str, suffix: str) -> str:
  """The installed file of distribution `dist` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.distribution(dist).files or []
  except importlib.metadata.PackageNotFoundError:
    raise BuildError(f'the {dist} wheel is not installed (pip install {dist}==2023.2.0)') from None
  for f in files:
    path = os.path.normpath(str(f.locate())).replace(os.sep, '/')
    if path.endswith('/' + suffix):
      return os.path.normpath(path)
  raise BuildError(f'the {dist} wheel has no file ending in {suffix}')


def onednn_library() -> str:
  """Path of the installed libdnnl.so.3 (from the onednn-cpu-gomp wheel)."""
  return _wheel_file(ONEDNN_RUNTIME, 'lib/libdnnl.so.3')


def _include_dirs() -> list[str]:
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.submodule_search_locations:
    raise BuildError('jaxlib is not installed (its XLA FFI headers are needed)')
  xla = os.path.join(list(spec.submodule_search_locations)[0], 'include')
  if not os.path.exists(os.path.join(xla, 'xla', 'ffi', 'api', 'ffi.h')):
    raise BuildError(f'jaxlib has no XLA FFI headers in {xla}')
  dnnl_hpp = _wheel_file(ONEDNN_DEVEL, 'include/oneapi/dnnl/dnnl.hpp')
  return [xla, os.path.dirname(os.path.dirname(os.path.dirname(dnnl_hpp)))]


def build(library_path: str | None = None, verbose: bool = False) -> str:
  """Compiles the library to `library_path` (default: next to the source); returns the path.

  Raises BuildError with the reason when it cannot (platform, compiler, wheels, compile error).
  """
  library_path = library_path or default_library_path()
  reason = supported_platform()
  if reason:
    raise BuildError(reason)
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not cxx:
    raise BuildError('no C++ compiler found (install g++, or set CXX)')
  includes = _include_dirs()
  dnnl = onednn_library()
  os.makedirs(os.path.dirname(os.path.abspath(library_path)), exist_ok=True)
  tmp = f'{library_path}.{os.getpid()}.tmp'
  cmd = [cxx, '-O3', '-std=c++17', '-shared', '-fPIC', '-fvisibility=hidden', '-fopenmp',
         *(f'-I{d}' for d in includes), SOURCE, '-o', tmp, dnnl]
  if verbose:
    print(' '.join(cmd), file=sys.stderr)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    if os.path.exists(tmp):
      os.remove(tmp)
    lines = proc.stderr.strip().splitlines() or ['(no output)']
    tail = next((l for l in lines if 'error' in l), lines[-1]).strip()
    raise BuildError(f'{os.path.basename(cxx)} failed on onednn_conv.cc: {tail}')
  os.replace(tmp, library_path)  # atomic: a concurrent loader never sees half a file
  if os.path.exists(error_file(library_path)):
    os.remove(error_file(library_path))
  return library_path


def build_or_record(library_path: str) -> str | None:
  """`build`, but a failure is written next to the library instead of raised (for setup.py):
  installing cnnjax never fails because of the kernels. Returns the reason or None."""
  try:
    build(library_path)
    return None
  except BuildError as e:
    reason = str(e)
  except OSError as e:
    reason = f'building failed: {e}'
  os.makedirs(os.path.dirname(os.path.abspath(library_path)), exist_ok=True)
  with open(error_file(library_path), 'w') as f:
    f.write(reason + '\n')
  return reason


if __name__ == '__main__':
  try:
    print(build(verbose=True))
  except BuildError as e:
    sys.exit(f'cnnjax: cannot build the oneDNN convolutions: {e}.')
