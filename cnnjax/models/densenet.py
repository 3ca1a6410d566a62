"""DenseNet-121/161/169/201 exactly as torchvision builds them.

Stem 7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max pool; four dense blocks whose layers
(BN + ReLU + 1x1 conv to ``bn_size * growth_rate``, BN + ReLU + 3x3 conv to ``growth_rate``)
each see the concatenation of all earlier feature maps; between blocks a transition (BN + ReLU
+ 1x1 conv halving the channels + 2x2 average pool); a final BN + ReLU, global average pool, fc.

Names are torchvision's: ``features/conv0``, ``features/norm0``,
``features/denseblock{b}/denselayer{l}/norm1|conv1|norm2|conv2``,
``features/transition{b}/norm|conv``, ``features/norm5``, ``classifier``. (torchvision's
pretrained files spell ``norm.1`` for ``norm1``; cnnjax.torchvision_weights renames them as
torchvision's loader does.) Initialization is torchvision's: Kaiming-normal (fan_in) convs,
BN 1/0, PyTorch-default fc weight with zero bias.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import ConvNoBias
from cnnjax.layers import AvgPool2d, BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear, MaxPool2d
from cnnjax.models.common import check_model_input, zeros

ModuleDef = Any
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (``bn_size * growth_rate``)-BN-ReLU-3x3 conv (``growth_rate``) [dropout]."""
  growth_rate: int
  bn_size: int = 4
  drop_rate: float = 0.0
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    frozen = not train
    y = self.conv(self.bn_size * self.growth_rate, kernel_size=1, name='conv1')(
        nn.relu(self.norm(name='norm1')(x, frozen)))
    y = self.conv(self.growth_rate, kernel_size=3, padding=1, name='conv2')(
        nn.relu(self.norm(name='norm2')(y, frozen)))
    if self.drop_rate > 0:
      y = Dropout(self.drop_rate, deterministic=frozen)(y)
    return y


class DenseBlock(nn.Module):
  """``num_layers`` DenseLayers (``denselayer1`` ...), each fed every earlier output; returns all
  of them and the input, concatenated."""
  num_layers: int
  growth_rate: int
  bn_size: int = 4
  drop_rate: float = 0.0
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    features = [x]
    for l in range(1, self.num_layers + 1):
      layer = DenseLayer(self.growth_rate, self.bn_size, self.drop_rate, conv=self.conv,
                         norm=self.norm, name=f'denselayer{l}')
      features.append(layer(jnp.concatenate(features, axis=-1), train))
    return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
  """BN + ReLU + 1x1 conv to half the channels + 2x2 average pool (``norm``, ``conv``)."""
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(self.norm(name='norm')(x, not train))
    x = self.conv(x.shape[-1] // 2, kernel_size=1, name='conv')(x)
    return AvgPool2d(2, 2, name='pool')(x)


class DenseFeatures(nn.Module):
  """torchvision's ``DenseNet.features``: stem, dense blocks, transitions, ``norm5``."""
  growth_rate: int
  block_config: Sequence[int]
  num_init_features: int
  bn_size: int = 4
  drop_rate: float = 0.0
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    frozen = not train
    x = self.conv(self.num_init_features, kernel_size=7, stride=2, padding=3, name='conv0')(x)
    x = nn.relu(self.norm(name='norm0')(x, frozen))
    x = MaxPool2d(3, 2, padding=1, name='pool0')(x)
    for b, num_layers in enumerate(self.block_config, start=1):
      x = DenseBlock(num_layers, self.growth_rate, self.bn_size, self.drop_rate, conv=self.conv,
                     norm=self.norm, name=f'denseblock{b}')(x, train)
      if b != len(self.block_config):
        x = Transition(conv=self.conv, norm=self.norm, name=f'transition{b}')(x, train)
    return self.norm(name='norm5')(x, frozen)


class DenseNet(nn.Module):
  """DenseNet; see the module docstring for the layout and names."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  drop_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'DenseNet', self.in_channels)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_in)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name)
    x = DenseFeatures(self.growth_rate, self.block_config, self.num_init_features, self.bn_size,
                      self.drop_rate, conv=conv, norm=norm, name='features')(x, train)
    x = GlobalAvgPool()(nn.relu(x))
    return Linear(self.num_classes, dtype=self.dtype, bias_init=zeros,
                  name='classifier')(x).astype(jnp.float32)


DenseNet121 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
DenseNet161 = partial(DenseNet, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96)
DenseNet169 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64)
DenseNet201 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64)
