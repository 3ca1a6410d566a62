"""CPU fast paths of `cnnjax.layers`: the same convolutions and pools, lowered so XLA:CPU runs them fast.

Two rewrites, each computing the same function as the plain ``lax`` op (to float32 rounding;
tests/test_layers.py checks outputs and gradients against PyTorch), used only on the CPU backend:

* `conv_space_to_depth`: a stride-1 convolution with very few channels (LeNet's and the tutorial
  net's) computed on s x s pixel blocks, where XLA:CPU's convolutions are 2-4x faster;
* `tiled`: pooling whose windows tile the input (stride == kernel, no padding) as a reduction
  over a reshaped view, whose gradient XLA:CPU computes without select-and-scatter
  (`max_over_tiles` for max pooling: the gradient to each window's first maximum, as PyTorch's).

`cpu_fast_paths(False)` turns both off while tracing, and with them `cnnjax.layers.Conv2d`'s
oneDNN convolutions (`cnnjax.kernels`): the exports and `cnnjax.summary`'s receptive-field trace
need ordinary convolutions and pools. `active()` says whether they are on for what is traced now;
it is the one place that reads the switch. Measurements: benchmarks/README.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cnnjax.switches import TraceSwitch

_CPU_FAST_PATHS = TraceSwitch('cpu_fast_paths', default=True)


def cpu_fast_paths(enabled: bool):
  """Turns the CPU fast paths (block convolutions, tiling pools, Conv2d's oneDNN convolutions)
  on or off while tracing.

  They compute the same function as the plain ``lax`` convolution and windowed reduction (to
  float32 rounding), but through reshapes or foreign calls; `cnnjax.summary` and the exports turn
  them off so that they see ordinary convolutions and pools.
  """
  return _CPU_FAST_PATHS(enabled)


def active() -> bool:
  """Whether the fast paths apply to what is traced now: on the CPU backend, unless switched off
  by `cpu_fast_paths(False)`."""
  return _CPU_FAST_PATHS.get() and jax.default_backend() == 'cpu'


def space_to_depth_block(in_channels: int, features: int, kernel_size, stride, dilation,
                         groups: int) -> int:
  """Block size s for computing a convolution on s x s pixel blocks (1: compute it directly).

  XLA:CPU convolutions are slow when the input has very few channels (3 for RGB, 1 for MNIST,
  6 in LeNet's second conv): 3-5 GFLOP/s. Rearranging the input into s x s blocks
  (``s*s*C`` channels) turns a k x k stride-1 convolution into a ceil((k+s-1)/s)-sized one on
  the block grid: more multiply-adds but channel counts XLA handles well (measured 2-4x faster
  per layer on a 2-core AVX-512 CPU, benchmarks/README.md). Blocks multiply the output channels
  by s*s too, so wide layers (a ResNet stem's 64 filters) stay direct. Always 2x2: 4x4 blocks
  for the 1-3-channel 5x5 convolutions (2.6x the multiply-adds, where 2x2 has 1.4x) made the
  lenet5 and tutorial_net train steps 1.11x slower on a 2-core AVX2 CPU (benchmarks/README.md).
  Only on the CPU backend, where it was measured.
  """
  if (not active() or groups != 1 or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1)
      or in_channels > 8 or features > 32 or min(kernel_size) < 3):
    return 1
  return 2


def _space_to_depth(x: jax.Array, s: int) -> jax.Array:
  n, h, w, c = x.shape
  x = x.reshape(n, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // s, w // s, s * s * c)


def _depth_to_space(x: jax.Array, s: int) -> jax.Array:
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, s, s, c // (s * s)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * s, w * s, c // (s * s))


def _block_kernel(kernel: jax.Array, s: int) -> jax.Array:
  """HWIO k x k kernel -> the equivalent kernel on s x s blocks: (kb, kb, s*s*I, s*s*O)."""
  kh, kw, i, o = kernel.shape
  bh, bw = -(-(kh + s - 1) // s), -(-(kw + s - 1) // s)
  shifted = []
  for a in range(s):      # output row offset inside a block
    for b in range(s):    # output column offset
      k = jnp.pad(kernel, ((a, s * bh - kh - a), (b, s * bw - kw - b), (0, 0), (0, 0)))
      k = k.reshape(bh, s, bw, s, i, o).transpose(0, 2, 1, 3, 4, 5).reshape(bh, bw, s * s * i, o)
      shifted.append(k)
  return jnp.stack(shifted, axis=-2).reshape(bh, bw, s * s * i, s * s * o)


def conv_space_to_depth(x: jax.Array, kernel: jax.Array, padding, s: int) -> jax.Array:
  """A stride-1 convolution (explicit padding) computed on s x s blocks; same result as lax."""
  kh, kw = kernel.shape[:2]
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  bh, bw = -(-(kh + s - 1) // s), -(-(kw + s - 1) // s)
  need_h, need_w = s * (-(-ho // s) + bh - 1), s * (-(-wo // s) + bw - 1)
  x = x[:, :need_h, :need_w]
  x = jnp.pad(x, ((0, 0), (0, need_h - x.shape[1]), (0, need_w - x.shape[2]), (0, 0)))
  y = jax.lax.conv_general_dilated(_space_to_depth(x, s), _block_kernel(kernel, s), (1, 1),
                                   'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return _depth_to_space(y, s)[:, :ho, :wo]


def tiled(x: jax.Array, kernel_size, stride, padding) -> jax.Array | None:
  """(N, H/kh, kh, W/kw, kw, C) when windows tile the input (stride == kernel, no padding), else
  None. XLA:CPU differentiates a reduction over this view with cheap elementwise ops instead of
  the select-and-scatter of a windowed reduction (3x faster tutorial_net step); max pooling
  reduces it with `max_over_tiles`."""
  if not active() or tuple(stride) != tuple(kernel_size) or any(lo or hi for lo, hi in padding):
    return None
  (kh, kw), (h, w) = kernel_size, x.shape[1:3]
  x = x[:, :h - h % kh, :w - w % kw]  # floor mode drops the remainder
  return x.reshape(x.shape[0], h // kh, kh, w // kw, kw, x.shape[3])


@jax.custom_vjp
def max_over_tiles(tiles: jax.Array) -> jax.Array:
  """Max pooling of `tiled`'s view: (N, H, kh, W, kw, C) -> (N, H, W, C).

  Its gradient goes to the first maximum of each window in row-major order, as
  PyTorch's ``max_pool2d`` does; differentiating ``max`` itself would share it among equal maxima
  and cost a reduction of the mask on top (tutorial_net's step: 1.08x faster this way, measured
  in benchmarks/README.md)."""
  return tiles.max(axis=(2, 4))


def _max_over_tiles_fwd(tiles):
  pooled = tiles.max(axis=(2, 4))
  return pooled, (tiles, pooled)


def _max_over_tiles_bwd(residuals, grad):
  tiles, pooled = residuals
  kw = tiles.shape[4]
  hit = tiles == pooled[:, :, None, :, None]
  order = (jax.lax.broadcasted_iota(jnp.int32, tiles.shape, 2) * kw
           + jax.lax.broadcasted_iota(jnp.int32, tiles.shape, 4))   # row-major place in the window
  first = jnp.where(hit, order, tiles.shape[2] * kw).min(axis=(2, 4), keepdims=True)
  return (jnp.where(order == first, grad[:, :, None, :, None], 0).astype(tiles.dtype),)


max_over_tiles.defvjp(_max_over_tiles_fwd, _max_over_tiles_bwd)
