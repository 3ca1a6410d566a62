"""MobileNetV3 large and small exactly as torchvision builds them (5,483,032 / 2,542,856
parameters with 1000 classes).

Stem 3x3 stride-2 conv + BN + hard-swish (16 channels), inverted residual blocks (1x1 expand ->
k x k depthwise -> optional squeeze-and-excitation with a hard-sigmoid gate -> 1x1 project; ReLU
or hard-swish), a 1x1 conv to 6x the last block's channels + BN + hard-swish, global average
pool, fc + hard-swish, dropout, fc. BatchNorm eps 1e-3, torch momentum 0.01 (Flax 0.99).

Names are torchvision's: ``features_0_0``/``features_0_1`` (stem), ``features_{i}`` (a block
with ``block_0_0``, ``block_0_1``, ... inside; the SE at ``block_{j}/fc1|fc2``),
``features_{n+1}_0``/``_1`` (head conv/BN), ``classifier_0`` and ``classifier_3``.
Initialization is torchvision's: Kaiming-normal fan_out convs with zero bias, BN 1/0, linear
N(0, 0.01) with zero bias.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import ConvNoBias, SqueezeExcitation, conv_norm_act, make_divisible
from cnnjax.layers import BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear
from cnnjax.models.common import check_model_input, kaiming_normal_fan_out, zeros

ModuleDef = Any

# (in, kernel, expanded, out, use_se, activation 'RE' | 'HS', stride): Tables 1 and 2 of the paper.
LARGE = (
    (16, 3, 16, 16, False, 'RE', 1), (16, 3, 64, 24, False, 'RE', 2),
    (24, 3, 72, 24, False, 'RE', 1), (24, 5, 72, 40, True, 'RE', 2),
    (40, 5, 120, 40, True, 'RE', 1), (40, 5, 120, 40, True, 'RE', 1),
    (40, 3, 240, 80, False, 'HS', 2), (80, 3, 200, 80, False, 'HS', 1),
    (80, 3, 184, 80, False, 'HS', 1), (80, 3, 184, 80, False, 'HS', 1),
    (80, 3, 480, 112, True, 'HS', 1), (112, 3, 672, 112, True, 'HS', 1),
    (112, 5, 672, 160, True, 'HS', 2), (160, 5, 960, 160, True, 'HS', 1),
    (160, 5, 960, 160, True, 'HS', 1),
)
SMALL = (
    (16, 3, 16, 16, True, 'RE', 2), (16, 3, 72, 24, False, 'RE', 2),
    (24, 3, 88, 24, False, 'RE', 1), (24, 5, 96, 40, True, 'HS', 2),
    (40, 5, 240, 40, True, 'HS', 1), (40, 5, 240, 40, True, 'HS', 1),
    (40, 5, 120, 48, True, 'HS', 1), (48, 5, 144, 48, True, 'HS', 1),
    (48, 5, 288, 96, True, 'HS', 2), (96, 5, 576, 96, True, 'HS', 1),
    (96, 5, 576, 96, True, 'HS', 1),
)


class InvertedResidualV3(nn.Module):
  """torchvision's MobileNetV3 ``InvertedResidual``; residual when stride 1 and in == out."""
  expanded: int
  features: int
  kernel_size: int = 3
  stride: int = 1
  use_se: bool = False
  activation: Any = nn.relu
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_channels = x.shape[-1]
    layer = partial(conv_norm_act, train=train, activation=self.activation, conv=self.conv,
                    norm=self.norm)
    i, y = 0, x
    if self.expanded != in_channels:
      y = layer(y, self.expanded, 1, name=f'block_{i}')
      i += 1
    y = layer(y, self.expanded, self.kernel_size, self.stride, groups=self.expanded,
              name=f'block_{i}')
    i += 1
    if self.use_se:
      y = SqueezeExcitation(make_divisible(self.expanded // 4, 8),
                            scale_activation=jax.nn.hard_sigmoid,
                            conv=partial(self.conv, use_bias=True), name=f'block_{i}')(y)
      i += 1
    y = layer(y, self.features, 1, activation=None, name=f'block_{i}')
    if self.stride == 1 and in_channels == self.features:
      y = y + x
    return y


class MobileNetV3(nn.Module):
  """MobileNetV3; see the module docstring for the layout and names."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  setting: Sequence[Sequence[Any]] = LARGE
  last_channel: int = 1280
  width_mult: float = 1.0
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'MobileNetV3', self.in_channels)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
                   bias_init=zeros)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name, epsilon=1e-3,
                   momentum=0.99)
    width = lambda c: make_divisible(c * self.width_mult, 8)
    layer = partial(conv_norm_act, train=train, activation=jax.nn.hard_swish, conv=conv, norm=norm)
    x = layer(x, width(self.setting[0][0]), 3, 2, name='features_0')
    for i, (_, kernel, expanded, out, use_se, act, stride) in enumerate(self.setting, start=1):
      x = InvertedResidualV3(width(expanded), width(out), kernel, stride, use_se,
                             jax.nn.hard_swish if act == 'HS' else nn.relu, conv=conv, norm=norm,
                             name=f'features_{i}')(x, train)
    x = layer(x, 6 * width(self.setting[-1][3]), 1, name=f'features_{len(self.setting) + 1}')
    x = GlobalAvgPool()(x)
    linear = partial(Linear, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                     bias_init=zeros)
    x = jax.nn.hard_swish(linear(width(self.last_channel), name='classifier_0')(x))
    x = Dropout(self.dropout, deterministic=not train)(x)
    return linear(self.num_classes, name='classifier_3')(x).astype(jnp.float32)


MobileNetV3Large = partial(MobileNetV3, setting=LARGE, last_channel=1280)
MobileNetV3Small = partial(MobileNetV3, setting=SMALL, last_channel=1024)
