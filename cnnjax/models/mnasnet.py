"""MNASNet-B1 at depth multipliers 0.5, 0.75, 1.0, 1.3 exactly as torchvision builds it.

Stem: 3x3 stride-2 conv + BN + ReLU, 3x3 depthwise + BN + ReLU, 1x1 conv + BN (16 channels
times alpha); six stacks of inverted residuals (1x1 expand + BN + ReLU, k x k depthwise + BN +
ReLU, 1x1 project + BN; residual when the shape is kept); 1x1 conv to 1280 + BN + ReLU; global
average pool, dropout, fc. Channels are ``depth * alpha`` rounded to multiples of 8 (never more
than 10% down). BatchNorm momentum is torch's 0.0003 (Flax 0.9997), as in torchvision.
torchvision's version-1 checkpoints with alpha != 1 (a fixed-size stem) are not supported.

Names are torchvision's: ``layers_0`` ... ``layers_7`` (stem), ``layers_{8..13}_{block}`` (with
``layers_0`` ... ``layers_7`` inside), ``layers_14``/``layers_15`` (head conv/BN),
``classifier_1``. Initialization is torchvision's (Kaiming-normal fan_out convs, BN 1/0, fc
Kaiming-uniform fan_out with gain 1).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import ConvNoBias
from cnnjax.layers import BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear
from cnnjax.models.common import check_model_input, kaiming_normal_fan_out, zeros

ModuleDef = Any
_DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)
# (kernel, stride, expansion, repeats) of the six stacks.
_STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))


def round_to_multiple_of(value: float, divisor: int, round_up_bias: float = 0.9) -> int:
  """torchvision's ``_round_to_multiple_of``: the nearest multiple, rounded up if more than
  ``1 - round_up_bias`` would be lost."""
  new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new_value if new_value >= round_up_bias * value else new_value + divisor


class MnasBlock(nn.Module):
  """torchvision's MNASNet ``_InvertedResidual`` (names ``layers_0`` ... ``layers_7``)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  expansion: int = 3
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    frozen, mid = not train, x.shape[-1] * self.expansion
    y = self.conv(mid, kernel_size=1, name='layers_0')(x)
    y = nn.relu(self.norm(name='layers_1')(y, frozen))
    y = self.conv(mid, kernel_size=self.kernel_size, stride=self.stride,
                  padding=self.kernel_size // 2, groups=mid, name='layers_3')(y)
    y = nn.relu(self.norm(name='layers_4')(y, frozen))
    y = self.conv(self.features, kernel_size=1, name='layers_6')(y)
    y = self.norm(name='layers_7')(y, frozen)
    return y + x if self.stride == 1 and x.shape[-1] == self.features else y


class MNASNet(nn.Module):
  """MNASNet with depth multiplier ``alpha``; see the module docstring."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  alpha: float = 1.0
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'MNASNet', self.in_channels)
    frozen = not train
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name, momentum=0.9997)
    depths = [round_to_multiple_of(d * self.alpha, 8) for d in _DEPTHS]
    x = conv(depths[0], kernel_size=3, stride=2, padding=1, name='layers_0')(x)
    x = nn.relu(norm(name='layers_1')(x, frozen))
    x = conv(depths[0], kernel_size=3, padding=1, groups=depths[0], name='layers_3')(x)
    x = nn.relu(norm(name='layers_4')(x, frozen))
    x = conv(depths[1], kernel_size=1, name='layers_6')(x)
    x = norm(name='layers_7')(x, frozen)
    for s, (kernel, stride, expansion, repeats) in enumerate(_STACKS):
      for b in range(repeats):
        x = MnasBlock(depths[s + 2], kernel, stride if b == 0 else 1, expansion, conv=conv,
                      norm=norm, name=f'layers_{8 + s}_{b}')(x, train)
    x = conv(1280, kernel_size=1, name='layers_14')(x)
    x = nn.relu(norm(name='layers_15')(x, frozen))
    x = GlobalAvgPool()(x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    fc = Linear(self.num_classes, dtype=self.dtype,
                kernel_init=nn.initializers.variance_scaling(1.0, 'fan_out', 'uniform'),
                bias_init=zeros, name='classifier_1')
    return fc(x).astype(jnp.float32)


MNASNet0_5 = partial(MNASNet, alpha=0.5)
MNASNet0_75 = partial(MNASNet, alpha=0.75)
MNASNet1_0 = partial(MNASNet, alpha=1.0)
MNASNet1_3 = partial(MNASNet, alpha=1.3)
