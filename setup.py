"""Builds cnnjax's oneDNN convolution library (cnnjax/kernels/onednn_conv.cc) at install time.

Everything else about the package is in pyproject.toml. The library is declared as an extension
so that ``pip install .`` and ``pip install -e .`` compile it (pyproject's build requirements bring
jaxlib's XLA FFI headers and oneDNN's headers); it is a plain shared library loaded with ctypes,
not a Python module. When it cannot be built (no compiler, another platform) installing still
succeeds: the reason is written next to where the library would be, and cnnjax repeats it once,
on its first convolution, and uses XLA's convolutions.
"""
import importlib.util
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(  # without importing cnnjax (and jax)
    'cnnjax_kernels_build', os.path.join(_HERE, 'cnnjax', 'kernels', 'build.py'))
kernel_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_build)


class BuildKernels(build_ext):
  """Compiles the kernel library with `cnnjax.kernels.build`; a failure is recorded, not fatal
  (the extension is then dropped, so nothing tries to copy or record a library that is not there).
  """

  def build_extensions(self):
    built = []
    for ext in self.extensions:
      reason = kernel_build.build_or_record(self.get_ext_fullpath(ext.name))
      # An editable install copies only the library into the source tree: the reason goes there.
      in_tree = kernel_build.error_file(kernel_build.default_library_path())
      if reason:
        self.warn(f"cnnjax: oneDNN convolutions not built ({reason}); cnnjax uses XLA's.")
        with open(in_tree, 'w') as f:
          f.write(reason + '\n')
      else:
        built.append(ext)
        if os.path.exists(in_tree):
          os.remove(in_tree)
    self.extensions[:] = built


setup(
    ext_modules=[Extension('cnnjax.kernels._onednn_conv',
                           sources=['cnnjax/kernels/onednn_conv.cc'])],
    cmdclass={'build_ext': BuildKernels},
)
