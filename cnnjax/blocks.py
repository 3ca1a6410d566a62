"""The repeated building blocks of classic CNNs, each matching its torchvision counterpart.

ResNet's ``BasicBlock`` and ``Bottleneck`` (v1.5: the stride sits on the 3x3 conv), a VGG stage,
GoogLeNet's ``BasicConv2d`` and ``Inception`` module, squeeze-and-excitation, EfficientNet's
``MBConv`` with stochastic depth, and torchvision's ``Conv2dNormActivation``.

Convolution and normalization are injected as ``functools.partial`` (as in Flax's ImageNet
example): a model binds dtype and initializers once, e.g.
``conv = partial(Conv2d, use_bias=False, dtype=dtype)``, ``norm = partial(BatchNorm, dtype=dtype)``,
and passes them down. Every block is called as ``block(x, train)``; ``train`` picks batch or
running statistics in BatchNorm and turns stochastic depth on (it draws from the 'dropout' rng).

Submodule names follow torchvision's attribute names with ``Sequential`` indices joined by an
underscore (``downsample.0`` -> ``downsample_0``); see cnnjax/models/common.py. ``vgg_stage``
and ``conv_norm_act`` are functions, not modules: they add their layers to the *calling* module
(call them inside an ``@nn.compact`` method) so the flat torchvision indices
(``features_0``, ``features_1``, ...) survive instead of gaining a level of nesting.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import ConfigError
from cnnjax.layers import BatchNorm, Conv2d, MaxPool2d

ModuleDef = Any
ConvNoBias = partial(Conv2d, use_bias=False)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """torchvision's ``_make_divisible``: round channels to a multiple of ``divisor``, losing < 10%."""
  min_value = divisor if min_value is None else min_value
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


class BasicBlock(nn.Module):
  """ResNet-18/34 block: 3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN, + shortcut, ReLU.

  The shortcut is a projection (1x1 conv with the block's stride + BN, torchvision's
  ``downsample.0/1``) when the stride or channel count changes, the identity otherwise.
  ``zero_init_residual`` starts the last BN scale at zero so the block begins as the identity.
  """
  expansion: ClassVar[int] = 1
  features: int
  stride: int = 1
  zero_init_residual: bool = False
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    frozen = not train
    y = self.conv(self.features, kernel_size=3, stride=self.stride, padding=1, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, frozen))
    y = self.conv(self.features, kernel_size=3, padding=1, name='conv2')(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name='bn2')(y, frozen)
    return nn.relu(y + _shortcut(self, x, self.features, frozen))


class Bottleneck(nn.Module):
  """ResNet-50/101/152 block: 1x1 reduce -> 3x3 (stride, v1.5) -> 1x1 expand (x4), + shortcut.

  ``features`` is torchvision's ``planes``; the output has ``4 * features`` channels. The inner
  width is ``int(features * base_width / 64) * groups`` and the 3x3 conv has ``groups`` groups,
  as in torchvision: ResNeXt is ``groups=32, base_width=4`` (32x4d), Wide ResNet
  ``base_width=128``; the defaults (1, 64) are ResNet-50's plain bottleneck.
  """
  expansion: ClassVar[int] = 4
  features: int
  stride: int = 1
  zero_init_residual: bool = False
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm
  groups: int = 1
  base_width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    frozen = not train
    out_features = self.features * self.expansion
    width = int(self.features * (self.base_width / 64.0)) * self.groups
    y = self.conv(width, kernel_size=1, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, frozen))
    y = self.conv(width, kernel_size=3, stride=self.stride, padding=1, groups=self.groups,
                  name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y, frozen))
    y = self.conv(out_features, kernel_size=1, name='conv3')(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name='bn3')(y, frozen)
    return nn.relu(y + _shortcut(self, x, out_features, frozen))


def _shortcut(block: nn.Module, x: jax.Array, out_features: int, frozen: bool) -> jax.Array:
  if block.stride == 1 and x.shape[-1] == out_features:
    return x
  x = block.conv(out_features, kernel_size=1, stride=block.stride, name='downsample_0')(x)
  return block.norm(name='downsample_1')(x, frozen)


def vgg_stage(x: jax.Array, features: int, num_convs: int, *, index: int, train: bool,
              batch_norm: bool = False, conv: ModuleDef = Conv2d, norm: ModuleDef = BatchNorm,
              prefix: str = 'features') -> tuple[jax.Array, int]:
  """One VGG stage: ``num_convs`` x (3x3 conv [+ BN] + ReLU), then a 2x2 max pool.

  Adds its layers to the calling module, named ``{prefix}_{i}`` with ``i`` counting from
  ``index`` exactly as torchvision's ``features`` Sequential counts (a ReLU takes an index but
  has no module). Returns the output and the next free index.
  """
  for _ in range(num_convs):
    x = conv(features, kernel_size=3, padding=1, name=f'{prefix}_{index}')(x)
    index += 1
    if batch_norm:
      x = norm(name=f'{prefix}_{index}')(x, not train)
      index += 1
    x = nn.relu(x)
    index += 1
  x = MaxPool2d(2, 2, name=f'{prefix}_{index}')(x)
  return x, index + 1


def conv_norm_act(x: jax.Array, features: int, kernel_size: int = 3, stride: int = 1, *,
                  name: str, train: bool, groups: int = 1,
                  activation: Callable[[jax.Array], jax.Array] | None = nn.silu,
                  conv: ModuleDef = ConvNoBias, norm: ModuleDef = BatchNorm) -> jax.Array:
  """torchvision's ``Conv2dNormActivation``: conv (padding (k-1)//2, no bias) -> BN -> act.

  Adds ``{name}_0`` (conv) and ``{name}_1`` (BN) to the calling module.
  """
  x = conv(features, kernel_size=kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
           groups=groups, name=f'{name}_0')(x)
  x = norm(name=f'{name}_1')(x, not train)
  return x if activation is None else activation(x)


class BasicConv2d(nn.Module):
  """GoogLeNet's conv unit: conv (no bias) -> BatchNorm (eps 0.001) -> ReLU; names conv, bn."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = partial(BatchNorm, epsilon=1e-3)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self.conv(self.features, kernel_size=self.kernel_size, stride=self.stride,
                  padding=self.padding, name='conv')(x)
    return nn.relu(self.norm(name='bn')(x, not train))


class Inception(nn.Module):
  """GoogLeNet's Inception module as torchvision builds it; four branches concatenated.

  branch1: 1x1. branch2: 1x1 reduce -> 3x3. branch3: 1x1 reduce -> **3x3**: the paper has a 5x5
  here, but torchvision uses 3x3 (pytorch/vision#906, kept for its pretrained weights), and so
  does this module so that parameters and weights match; ``ch5x5red``/``ch5x5`` keep the
  paper's names. branch4: 3x3 max pool (stride 1, pad 1, ceil_mode) -> 1x1 projection.
  Names: branch1, branch2_0, branch2_1, branch3_0, branch3_1, branch4_1 (branch4_0 is the pool).
  """
  ch1x1: int
  ch3x3red: int
  ch3x3: int
  ch5x5red: int
  ch5x5: int
  pool_proj: int
  conv_block: ModuleDef = BasicConv2d

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block = self.conv_block
    b1 = block(self.ch1x1, name='branch1')(x, train)
    b2 = block(self.ch3x3red, name='branch2_0')(x, train)
    b2 = block(self.ch3x3, kernel_size=3, padding=1, name='branch2_1')(b2, train)
    b3 = block(self.ch5x5red, name='branch3_0')(x, train)
    b3 = block(self.ch5x5, kernel_size=3, padding=1, name='branch3_1')(b3, train)
    b4 = MaxPool2d(3, stride=1, padding=1, ceil_mode=True, name='branch4_0')(x)
    b4 = block(self.pool_proj, name='branch4_1')(b4, train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class SqueezeExcitation(nn.Module):
  """torchvision's ``SqueezeExcitation``: x * sigmoid(fc2(act(fc1(mean_hw(x))))).

  fc1 and fc2 are 1x1 convolutions with bias (as in torchvision, so weights port unchanged).
  """
  squeeze_channels: int
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  scale_activation: Callable[[jax.Array], jax.Array] = nn.sigmoid
  conv: ModuleDef = Conv2d

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = jnp.mean(x, axis=(1, 2), keepdims=True)
    scale = self.activation(self.conv(self.squeeze_channels, kernel_size=1, name='fc1')(scale))
    scale = self.conv(x.shape[-1], kernel_size=1, name='fc2')(scale)
    return x * self.scale_activation(scale)


def stochastic_depth(x: jax.Array, rate: float, *, deterministic: bool,
                     rng: jax.Array | None = None) -> jax.Array:
  """torchvision's ``stochastic_depth(mode='row')``: zero whole samples with probability
  ``rate`` and scale the survivors by 1 / (1 - rate). Identity when deterministic or rate 0."""
  if not 0.0 <= rate <= 1.0:
    raise ConfigError(f'stochastic depth rate must be in [0, 1], got {rate}.')
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  scale = mask / keep if keep > 0.0 else mask
  return x * scale.astype(x.dtype)


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """`stochastic_depth` of a residual branch inside ``module``, drawing the module's 'dropout'
  rng only when it is needed (training with a non-zero rate)."""
  rng = module.make_rng('dropout') if train and rate > 0.0 else None
  return stochastic_depth(x, rate, deterministic=not train, rng=rng)


class MBConv(nn.Module):
  """EfficientNet's inverted bottleneck, exactly torchvision's ``MBConv``.

  1x1 expand to ``make_divisible(in * expand_ratio)`` (skipped when that equals ``in``) ->
  k x k depthwise (stride) -> squeeze-and-excitation (``max(1, in // 4)`` channels, SiLU) ->
  1x1 project to ``features`` (no activation). With stride 1 and ``in == features`` the block
  is residual and the branch passes through stochastic depth ('row' mode, 'dropout' rng).
  Names: ``block_0_0``/``block_0_1`` (conv/BN), ... with the SE at ``block_{i}/fc1|fc2``, the
  indices shifting down by one when there is no expansion, as in torchvision.
  """
  features: int
  expand_ratio: float = 6.0
  kernel_size: int = 3
  stride: int = 1
  stochastic_depth_prob: float = 0.0
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_channels = x.shape[-1]
    expanded = make_divisible(in_channels * self.expand_ratio, 8)
    layer = partial(conv_norm_act, train=train, conv=self.conv, norm=self.norm)
    i, y = 0, x
    if expanded != in_channels:
      y = layer(y, expanded, 1, name=f'block_{i}')
      i += 1
    y = layer(y, expanded, self.kernel_size, self.stride, groups=expanded, name=f'block_{i}')
    y = SqueezeExcitation(max(1, in_channels // 4), activation=nn.silu,
                          conv=partial(self.conv, use_bias=True), name=f'block_{i + 1}')(y)
    y = layer(y, self.features, 1, activation=None, name=f'block_{i + 2}')
    if self.stride == 1 and in_channels == self.features:
      y = drop_path(self, y, self.stochastic_depth_prob, train) + x
    return y


class FusedMBConv(nn.Module):
  """EfficientNetV2's fused inverted bottleneck, exactly torchvision's ``FusedMBConv``.

  k x k conv (stride) to ``make_divisible(in * expand_ratio)`` + BN + SiLU -> 1x1 project + BN;
  without expansion a single k x k conv + BN + SiLU to ``features``. Residual (through stochastic
  depth) when stride 1 and ``in == features``. Names: ``block_0_0``/``block_0_1``,
  ``block_1_0``/``block_1_1``.
  """
  features: int
  expand_ratio: float = 4.0
  kernel_size: int = 3
  stride: int = 1
  stochastic_depth_prob: float = 0.0
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_channels = x.shape[-1]
    expanded = make_divisible(in_channels * self.expand_ratio, 8)
    layer = partial(conv_norm_act, train=train, conv=self.conv, norm=self.norm)
    if expanded != in_channels:
      y = layer(x, expanded, self.kernel_size, self.stride, name='block_0')
      y = layer(y, self.features, 1, activation=None, name='block_1')
    else:
      y = layer(x, self.features, self.kernel_size, self.stride, name='block_0')
    if self.stride == 1 and in_channels == self.features:
      y = drop_path(self, y, self.stochastic_depth_prob, train) + x
    return y
