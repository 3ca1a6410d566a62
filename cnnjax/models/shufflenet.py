"""ShuffleNetV2 x0.5, x1.0, x1.5, x2.0 exactly as torchvision builds them.

Stem 3x3 stride-2 conv + BN + ReLU (24 channels) + 3x3 stride-2 max pool, three stages of
(4, 8, 4) units, a 1x1 conv + BN + ReLU (1024 channels; 2048 for x2.0), global average pool, fc.
A unit with stride 1 splits its channels in half, transforms one half (1x1 conv + BN + ReLU,
3x3 depthwise + BN, 1x1 conv + BN + ReLU) and concatenates it with the other; a stride-2 unit
transforms both (``branch1``: depthwise + BN, 1x1 + BN + ReLU). Then the channels are shuffled
between the two groups (`channel_shuffle`).

Names are torchvision's: ``conv1_0``/``conv1_1``, ``stage{2,3,4}_{i}`` (with ``branch1_{j}``,
``branch2_{j}`` inside), ``conv5_0``/``conv5_1``, ``fc``. Initialization: PyTorch's defaults
(torchvision does not re-initialize ShuffleNetV2).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import ConvNoBias
from cnnjax.layers import BatchNorm, Conv2d, GlobalAvgPool, Linear, MaxPool2d
from cnnjax.models.common import check_model_input

ModuleDef = Any


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """torchvision's ``channel_shuffle`` for NHWC: channel ``g * (C/groups) + i`` moves to
  ``i * groups + g`` (view as (groups, C/groups), transpose, flatten)."""
  *lead, channels = x.shape
  x = x.reshape(*lead, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


class ShuffleUnit(nn.Module):
  """torchvision's ShuffleNetV2 ``InvertedResidual`` with ``features`` output channels."""
  features: int
  stride: int = 1
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    frozen, half = not train, self.features // 2

    def branch(y, name, depthwise_first):
      if not depthwise_first:
        y = self.conv(half, kernel_size=1, name=f'{name}_0')(y)
        y = nn.relu(self.norm(name=f'{name}_1')(y, frozen))
      i = 0 if depthwise_first else 3
      channels = y.shape[-1]
      y = self.conv(channels, kernel_size=3, stride=self.stride, padding=1, groups=channels,
                    name=f'{name}_{i}')(y)
      y = self.norm(name=f'{name}_{i + 1}')(y, frozen)
      y = self.conv(half, kernel_size=1, name=f'{name}_{i + 2}')(y)
      return nn.relu(self.norm(name=f'{name}_{i + 3}')(y, frozen))

    if self.stride == 1:
      x1, x2 = jnp.split(x, 2, axis=-1)
      out = jnp.concatenate([x1, branch(x2, 'branch2', False)], axis=-1)
    else:
      out = jnp.concatenate([branch(x, 'branch1', True), branch(x, 'branch2', False)], axis=-1)
    return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNetV2; see the module docstring for the layout and names."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  stages_repeats: Sequence[int] = (4, 8, 4)
  stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'ShuffleNetV2', self.in_channels)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name)
    channels = self.stages_out_channels
    x = conv(channels[0], kernel_size=3, stride=2, padding=1, name='conv1_0')(x)
    x = nn.relu(norm(name='conv1_1')(x, not train))
    x = MaxPool2d(3, 2, padding=1, name='maxpool')(x)
    for stage, (repeats, out) in enumerate(zip(self.stages_repeats, channels[1:-1]), start=2):
      for i in range(repeats):
        x = ShuffleUnit(out, stride=2 if i == 0 else 1, conv=conv, norm=norm,
                        name=f'stage{stage}_{i}')(x, train)
    x = conv(channels[-1], kernel_size=1, name='conv5_0')(x)
    x = nn.relu(norm(name='conv5_1')(x, not train))
    x = GlobalAvgPool()(x)
    return Linear(self.num_classes, dtype=self.dtype, name='fc')(x).astype(jnp.float32)


ShuffleNetV2x0_5 = partial(ShuffleNetV2, stages_out_channels=(24, 48, 96, 192, 1024))
ShuffleNetV2x1_0 = partial(ShuffleNetV2, stages_out_channels=(24, 116, 232, 464, 1024))
ShuffleNetV2x1_5 = partial(ShuffleNetV2, stages_out_channels=(24, 176, 352, 704, 1024))
ShuffleNetV2x2_0 = partial(ShuffleNetV2, stages_out_channels=(24, 244, 488, 976, 2048))
