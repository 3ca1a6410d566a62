"""MobileNetV2 exactly as torchvision builds it (3,504,872 parameters with 1000 classes).

Stem 3x3 stride-2 conv + BN + ReLU6 (32 channels), 17 inverted residual blocks, a 1x1 conv to
1280 channels + BN + ReLU6, global average pool, dropout 0.2, fc.

Names are torchvision's: ``features_0_0``/``features_0_1`` (stem conv/BN), ``features_{i}``
(an ``InvertedResidual`` with ``conv_0_0``, ``conv_0_1``, ... inside), ``features_18_0``/
``features_18_1`` (head conv/BN), ``classifier_1``. Initialization is torchvision's:
Kaiming-normal fan_out convs, BN 1/0, linear N(0, 0.01) with zero bias.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import ConvNoBias, conv_norm_act, make_divisible
from cnnjax.layers import BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear
from cnnjax.models.common import check_model_input, kaiming_normal_fan_out, zeros

ModuleDef = Any

# (expand_ratio t, out_channels c, num_blocks n, first stride s): Table 2 of the paper.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
  """torchvision's MobileNetV2 block: [1x1 expand + BN + ReLU6] -> 3x3 depthwise (stride) + BN +
  ReLU6 -> 1x1 project + BN; residual when stride 1 and channels are unchanged.

  Names: ``conv_0_0``/``conv_0_1`` (expand), ``conv_1_0``/``conv_1_1`` (depthwise), ``conv_2``
  (project), ``conv_3`` (its BN); without expansion the indices shift down by one.
  """
  features: int
  stride: int = 1
  expand_ratio: float = 6.0
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_channels = x.shape[-1]
    hidden = int(round(in_channels * self.expand_ratio))
    layer = partial(conv_norm_act, train=train, activation=jax.nn.relu6, conv=self.conv,
                    norm=self.norm)
    i, y = 0, x
    if self.expand_ratio != 1:
      y = layer(y, hidden, 1, name=f'conv_{i}')
      i += 1
    y = layer(y, hidden, 3, self.stride, groups=hidden, name=f'conv_{i}')
    y = self.conv(self.features, kernel_size=1, name=f'conv_{i + 1}')(y)
    y = self.norm(name=f'conv_{i + 2}')(y, not train)
    if self.stride == 1 and in_channels == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2; see the module docstring for the layout and names."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  width_mult: float = 1.0
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'MobileNetV2', self.in_channels)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name)
    layer = partial(conv_norm_act, train=train, activation=jax.nn.relu6, conv=conv, norm=norm)
    x = layer(x, make_divisible(32 * self.width_mult), 3, 2, name='features_0')
    index = 1
    for t, c, n, s in _STAGES:
      for b in range(n):
        x = InvertedResidual(make_divisible(c * self.width_mult), stride=s if b == 0 else 1,
                             expand_ratio=t, conv=conv, norm=norm, name=f'features_{index}')(x, train)
        index += 1
    x = layer(x, make_divisible(1280 * max(1.0, self.width_mult)), 1, name=f'features_{index}')
    x = GlobalAvgPool()(x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    fc = Linear(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                bias_init=zeros, name='classifier_1')
    return fc(x).astype(jnp.float32)
