"""ResNets: torchvision's ImageNet layout (ResNet-18 ... 152, v1.5, ResNeXt, Wide ResNet) and
CIFAR variants.

The ImageNet stem is a 7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max pool; the CIFAR stem
(``stem='cifar'``) is a 3x3 stride-1 conv + BN + ReLU with no pool. Stage ``i`` has
``num_filters * 2**i`` channels (times the block's expansion) and stride 2 from the second stage
on. Global average pool, then ``fc``.

Names are torchvision's: ``conv1``, ``bn1``, ``layer{s}_{b}`` (``layer1.0``) with ``conv1``,
``bn1``, ..., ``downsample_0``/``downsample_1`` inside, and ``fc``. Initialization is
torchvision's (Kaiming-normal fan_out convs, BN 1/0, PyTorch-default fc); ``zero_init_residual``
zeroes the last BN scale of every block.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import BasicBlock, Bottleneck
from cnnjax.errors import ConfigError
from cnnjax.layers import BatchNorm, Conv2d, GlobalAvgPool, Linear, MaxPool2d
from cnnjax.models.common import check_model_input, kaiming_normal_fan_out

ModuleDef = Any


class ResNet(nn.Module):
  """A residual network; see the module docstring for the layout and names."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: ModuleDef = BasicBlock
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  num_filters: int = 64
  stem: str = 'imagenet'
  zero_init_residual: bool = False
  groups: int = 1             # ResNeXt's cardinality (Bottleneck only)
  width_per_group: int = 64   # ResNeXt's d, Wide ResNet's 128 (Bottleneck only)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'ResNet', self.in_channels)
    if self.stem not in ('imagenet', 'cifar'):
      raise ConfigError(f"ResNet stem must be 'imagenet' or 'cifar', got {self.stem!r}.")
    wide = {}
    if (self.groups, self.width_per_group) != (1, 64):
      if self.block_cls is BasicBlock:
        raise ConfigError('ResNet groups and width_per_group need Bottleneck blocks (as in '
                          'torchvision); BasicBlock supports only groups=1, width_per_group=64.')
      wide = dict(groups=self.groups, base_width=self.width_per_group)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name)
    if self.stem == 'imagenet':
      x = conv(self.num_filters, kernel_size=7, stride=2, padding=3, name='conv1')(x)
    else:
      x = conv(self.num_filters, kernel_size=3, stride=1, padding=1, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x, not train))
    if self.stem == 'imagenet':
      x = MaxPool2d(3, stride=2, padding=1, name='maxpool')(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
            self.num_filters * 2**i, stride=2 if i > 0 and j == 0 else 1,
            zero_init_residual=self.zero_init_residual, conv=conv, norm=norm,
            name=f'layer{i + 1}_{j}', **wide)(x, train)
    x = GlobalAvgPool()(x)
    return Linear(self.num_classes, dtype=self.dtype, name='fc')(x).astype(jnp.float32)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
# ResNeXt (groups x width_per_group, "32x4d") and Wide ResNet (twice the bottleneck width).
ResNeXt50_32x4d = partial(ResNet50, groups=32, width_per_group=4)
ResNeXt101_32x8d = partial(ResNet101, groups=32, width_per_group=8)
ResNeXt101_64x4d = partial(ResNet101, groups=64, width_per_group=4)
WideResNet50_2 = partial(ResNet50, width_per_group=128)
WideResNet101_2 = partial(ResNet101, width_per_group=128)
# CIFAR layouts: 3x3 stem, no max pool, 10 classes.
CifarResNet18 = partial(ResNet18, stem='cifar', num_classes=10)
SmallResNet = partial(ResNet, stage_sizes=(2, 2, 2), block_cls=BasicBlock, stem='cifar',
                      num_classes=10)
