"""StableHLO through `jax.export`: a serialized, batch-polymorphic artifact of the eval-mode model.

The weights are constants of the module (BatchNorm on its running statistics, which XLA folds
when it compiles), the input is float32 NHWC with a symbolic batch dimension ``b``, and the module
is lowered for the CPU, CUDA and TPU backends at once, so one file runs on each. Load it with
`load` (``jax.export.deserialize``) and call it on any batch size:

    exported = cnnjax.export.stablehlo.load('mnist_cnn.stablehlo')
    logits = exported.call(images)            # (N, 28, 28, 1) float32, normalized

cnnjax's CPU fast paths (convolutions on pixel blocks, pools as reshapes) are turned off while
exporting: the artifact holds plain convolutions and windowed reductions, the same function.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp

from cnnjax.export.check import forward
from cnnjax.fast_paths import cpu_fast_paths

PLATFORMS = ('cpu', 'cuda', 'tpu')


def batch_polymorphic(input_shape: Sequence[int], dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  """The input spec ``(b, H, W, C)`` with a symbolic batch size ``b`` (input_shape is HWC)."""
  dims = ', '.join(str(int(d)) for d in input_shape)
  return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'b, {dims}'), dtype)


def export(model, variables, input_shape: Sequence[int],
           platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
  """The eval-mode model as a `jax.export.Exported` taking ``(b, *input_shape)`` float32."""
  with cpu_fast_paths(False):
    return jax.export.export(jax.jit(forward(model, variables)), platforms=tuple(platforms))(
        batch_polymorphic(input_shape))


def save(exported: jax.export.Exported, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.write_bytes(exported.serialize())
  return path


def load(path: str | pathlib.Path) -> jax.export.Exported:
  """The artifact `save` wrote, ready to `.call(images)` (`jax.export.deserialize`)."""
  return jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))


def runner(path: str | pathlib.Path):
  """A function batch -> logits (NumPy) running the saved artifact, jit-compiled per shape."""
  call = jax.jit(load(path).call)
  return lambda x: jax.device_get(call(jnp.asarray(x)))
