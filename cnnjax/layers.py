"""The layers every CNN is made of: convolution, pooling, batch norm, dropout, linear.

All layers take NHWC inputs and are pure Flax Linen modules: their state lives only in the
`params` and `batch_stats` collections, declared by the layer itself, so a layer named ``conv1``
holds ``conv1/kernel`` and ``conv1/bias`` (Conv2d, Linear) or ``conv1/scale``, ``conv1/bias`` and
the batch_stats ``conv1/mean``, ``conv1/var`` (BatchNorm). They follow PyTorch's semantics exactly
so that torchvision weights port by transposition alone:

* integer padding is symmetric (PyTorch pads ``p`` on every side; Flax's 'SAME' with stride 2
  would pad (0, 1) instead, which shifts every window by one pixel);
* the default initializers are PyTorch's (uniform in +-1/sqrt(fan_in) for weights and biases);
* BatchNorm uses eps=1e-5 and updates its running variance with the unbiased batch variance.

On the CPU, `Conv2d` runs on oneDNN's convolutions (`cnnjax.kernels`: when its library is
built and the CPU has AVX2 or AVX-512, or ``CNNJAX_ONEDNN=1``; ``=0`` turns it off), convolutions with
very few channels and tiling pools take the fast paths of `cnnjax.fast_paths` (same results,
faster under XLA:CPU).

Momentum conventions differ between the frameworks: Flax keeps ``momentum`` as the weight of the
*old* running statistic, PyTorch as the weight of the *new* batch statistic. Flax 0.9 == PyTorch
0.1, and that is the default here.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import kernels
from cnnjax.errors import ShapeError
from cnnjax.fast_paths import conv_space_to_depth, max_over_tiles, space_to_depth_block, tiled
from cnnjax.shapes import Padding, conv_output_size, explicit_padding, pair, pool_padding

Dtype = Any


def check_input(x: jax.Array, layer: str) -> None:
  if x.ndim != 4:
    raise ShapeError(f'{layer} expects NHWC input of rank 4, got shape {tuple(x.shape)}.')


def uniform_init(bound: float):
  """U(-bound, bound), the initializer behind PyTorch's defaults."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_uniform_init(fan_in: int):
  """PyTorch's default init for conv and linear weights and biases: U(-1/sqrt(fan_in), +)."""
  return uniform_init(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
  """y + the (float32) bias, computed in float32 when y is bfloat16 and rounded once: the bias
  gradient is then a float32 sum, which XLA:CPU reduces fast (bfloat16 sums it computes as slow
  windowed reductions)."""
  if bias is None:
    return y
  bias = bias.reshape((1,) * (y.ndim - 1) + (-1,))
  wide = jnp.promote_types(y.dtype, bias.dtype)
  return (y.astype(wide) + bias.astype(wide)).astype(y.dtype)


class Conv2d(nn.Module):
  """2-D convolution, NHWC, with PyTorch's padding semantics and initialization.

  ``groups=in_channels`` gives a depthwise convolution. Kernels are HWIO
  (``(kh, kw, in_channels // groups, features)``); a PyTorch OIHW weight ports as
  ``w.transpose(2, 3, 1, 0)``.
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  stride: int | Sequence[int] = 1
  padding: Padding = 0
  dilation: int | Sequence[int] = 1
  groups: int = 1
  use_bias: bool = True
  dtype: Dtype | None = None
  kernel_init: Any = None   # None: PyTorch's default
  bias_init: Any = None     # None: PyTorch's default

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, 'Conv2d')
    kernel_size = pair(self.kernel_size, 'kernel_size')
    stride = pair(self.stride, 'stride')
    dilation = pair(self.dilation, 'dilation')
    padding = explicit_padding(self.padding, kernel_size, stride, dilation)
    in_channels = x.shape[-1]
    if in_channels % self.groups or self.features % self.groups:
      raise ShapeError(f'Conv2d: in_channels {in_channels} and features {self.features} must both '
                       f'be divisible by groups {self.groups}.')
    conv_output_size(x.shape[1:3], kernel_size, stride, padding, dilation, layer='Conv2d')
    fan_in = in_channels // self.groups * kernel_size[0] * kernel_size[1]
    default_init = torch_uniform_init(fan_in)
    kernel = self.param('kernel', self.kernel_init or default_init,
                        (*kernel_size, in_channels // self.groups, self.features), jnp.float32)
    bias = (self.param('bias', self.bias_init or default_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    param = kernel
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    block = space_to_depth_block(in_channels, self.features, kernel_size, stride, dilation,
                                 self.groups)
    if block > 1:
      y = conv_space_to_depth(x, kernel, padding, block)
    elif kernels.supports(x, kernel, padding) and kernels.active():
      # The float32 parameter itself: oneDNN rounds it to x's dtype and returns a float32 gradient.
      y = kernels.conv2d(x, param if param.dtype == jnp.float32 else kernel, stride, padding,
                         dilation, self.groups)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, stride, padding, rhs_dilation=dilation,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=self.groups)
    return _add_bias(y, bias)


class Linear(nn.Module):
  """Fully connected layer with PyTorch's default initialization (kernel is (in, out))."""
  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  kernel_init: Any = None
  bias_init: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    default_init = torch_uniform_init(x.shape[-1])
    kernel = self.param('kernel', self.kernel_init or default_init,
                        (x.shape[-1], self.features), jnp.float32)
    bias = (self.param('bias', self.bias_init or default_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return _add_bias(y, bias)


def _pool_window(name: str, x: jax.Array, kernel_size, stride, padding, ceil_mode: bool):
  """(kernel, stride, per-side padding) of a pool: PyTorch's rules, `cnnjax.shapes.pool_padding`."""
  check_input(x, name)
  kernel_size = pair(kernel_size, 'kernel_size')
  stride = pair(kernel_size if stride is None else stride, 'stride')
  return kernel_size, stride, pool_padding(x.shape[1:3], kernel_size, stride, padding, ceil_mode,
                                           layer=name)


class MaxPool2d(nn.Module):
  """Max pooling like ``torch.nn.MaxPool2d`` (padded cells are -inf; stride defaults to kernel)."""
  kernel_size: int | Sequence[int] = 2
  stride: int | Sequence[int] | None = None
  padding: Padding = 0
  ceil_mode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size, stride, padding = _pool_window(
        'MaxPool2d', x, self.kernel_size, self.stride, self.padding, self.ceil_mode)
    tiles = tiled(x, kernel_size, stride, padding)
    if tiles is not None:
      return max_over_tiles(tiles)
    return nn.max_pool(x, kernel_size, stride, padding)


class AvgPool2d(nn.Module):
  """Average pooling like ``torch.nn.AvgPool2d``: padded zeros count in the divisor by default."""
  kernel_size: int | Sequence[int] = 2
  stride: int | Sequence[int] | None = None
  padding: Padding = 0
  count_include_pad: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size, stride, padding = _pool_window(
        'AvgPool2d', x, self.kernel_size, self.stride, self.padding, False)
    tiles = tiled(x, kernel_size, stride, padding)
    if tiles is not None:
      return tiles.mean(axis=(2, 4))
    return nn.avg_pool(x, kernel_size, stride, padding, count_include_pad=self.count_include_pad)


class GlobalAvgPool(nn.Module):
  """Mean over height and width: (N, H, W, C) -> (N, C). ``AdaptiveAvgPool2d(1)`` + flatten."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, 'GlobalAvgPool')
    return jnp.mean(x, axis=(1, 2))


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
  """``torch.nn.functional.adaptive_avg_pool2d`` for NHWC: bin i spans
  [floor(i*H/out), ceil((i+1)*H/out)). Used by VGG and AlexNet's 7x7 / 6x6 pooling."""
  check_input(x, 'adaptive_avg_pool')
  out_h, out_w = pair(output_size, 'output_size')
  h, w = x.shape[1:3]
  if (h, w) == (out_h, out_w):
    return x
  if h % out_h == 0 and w % out_w == 0:  # uniform bins: one reshape
    return x.reshape(x.shape[0], out_h, h // out_h, out_w, w // out_w, x.shape[3]).mean(axis=(2, 4))
  rows = []
  for i in range(out_h):
    r0, r1 = (i * h) // out_h, -(-((i + 1) * h) // out_h)
    cols = []
    for j in range(out_w):
      c0, c1 = (j * w) // out_w, -(-((j + 1) * w) // out_w)
      cols.append(x[:, r0:r1, c0:c1, :].mean(axis=(1, 2)))
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


class BatchNorm(nn.Module):
  """Batch normalization over N, H, W with PyTorch's semantics.

  Training (``use_running_average=False``): normalize with the batch mean and biased variance;
  update ``batch_stats`` as ``running = momentum * running + (1 - momentum) * batch`` with the
  *unbiased* batch variance, as PyTorch does. Evaluation: normalize with the running statistics.

  ``momentum`` uses Flax's convention (weight of the old value): Flax 0.9 == PyTorch 0.1.
  Under ``jax.jit`` with a sharded batch the statistics are global automatically; under
  ``jax.pmap`` pass ``axis_name`` so they are averaged across devices.
  Statistics are computed in float32 even when ``dtype`` is bfloat16.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros
  axis_name: str | None = None
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=reduce_axes)
      mean_sq = jnp.mean(jnp.square(x32), axis=reduce_axes)
      count = math.prod(x.shape[a] for a in reduce_axes)
      if self.axis_name is not None and not self.is_initializing():
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
        count = count * jax.lax.psum(1, self.axis_name)
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
      if not self.is_initializing():
        unbiased_var = var * (count / jnp.maximum(count - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased_var

    inv = jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      inv = inv * self.param('scale', self.scale_init, (features,), jnp.float32)
    shift = -mean * inv
    if self.use_bias:
      shift = shift + self.param('bias', self.bias_init, (features,), jnp.float32)
    # The affine map in float32 on the (possibly bfloat16) values, rounded once: its gradients
    # with respect to scale and bias are then float32 sums, which XLA:CPU reduces fast (bfloat16
    # sums it computes as slow windowed reductions: small_resnet's bfloat16 step 1.4x slower).
    return (x.astype(jnp.float32) * inv + shift).astype(self.dtype or x.dtype)


Dropout = nn.Dropout
