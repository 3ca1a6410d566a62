"""RegNet X and Y (400MF ... 128GF, 15 sizes) exactly as torchvision builds them.

Stem 3x3 stride-2 conv + BN + ReLU (32 channels); four stages of residual bottleneck blocks
(1x1 conv ``a`` -> 3x3 grouped conv ``b`` (stride, groups of ``group_width`` channels) ->
[RegNetY: squeeze-and-excitation ``se``, a quarter of the block's input width] -> 1x1 conv ``c``
+ BN, with a projection ``proj`` when the shape changes; ReLU after the sum); global average
pool, fc. The stage widths and depths come from the paper's quantized linear rule
(`block_params`, torchvision's ``BlockParams.from_init_params``, computed in float32 as torch
does).

Names are torchvision's: ``stem_0``/``stem_1``, ``trunk_output/block{s}/block{s}-{i}`` with
``f/a_0``, ``f/a_1``, ``f/b_0``, ``f/b_1``, ``f/se/fc1|fc2``, ``f/c_0``, ``f/c_1`` and
``proj_0``/``proj_1`` inside, ``fc``. Initialization is torchvision's: convs N(0, sqrt(2 /
fan_out)), BN 1/0, fc N(0, 0.01) with zero bias.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.blocks import ConvNoBias, SqueezeExcitation, conv_norm_act, make_divisible
from cnnjax.errors import ConfigError
from cnnjax.layers import BatchNorm, Conv2d, GlobalAvgPool, Linear
from cnnjax.models.common import check_model_input, kaiming_normal_fan_out, zeros

ModuleDef = Any


class Stage(NamedTuple):
  width: int
  depth: int
  group_width: int


def block_params(depth: int, w_0: int, w_a: float, w_m: float, group_width: int,
                 bottleneck_multiplier: float = 1.0) -> list[Stage]:
  """The stages of a RegNet from its design parameters (Radosavovic et al. 2020, section 3.3),
  exactly as torchvision computes them (float32, round half to even)."""
  if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8:
    raise ConfigError(f'invalid RegNet settings w_0={w_0}, w_a={w_a}, w_m={w_m}.')
  f32 = np.float32
  widths_cont = np.arange(depth).astype(f32) * f32(w_a) + f32(w_0)
  capacity = np.round(np.log(widths_cont / f32(w_0)) / f32(np.log(w_m)))
  widths = (np.round(f32(w_0) * np.power(f32(w_m), capacity).astype(f32) / f32(8)) * 8)
  widths = widths.astype(np.int64).tolist()
  stages: list[list[int]] = []  # [width, depth]
  for w in widths:
    if stages and stages[-1][0] == w:
      stages[-1][1] += 1
    else:
      stages.append([w, 1])
  out = []
  for w, d in stages:  # make the bottleneck width divisible by the group width
    w_bot = int(w * bottleneck_multiplier)
    g = min(group_width, w_bot)
    out.append(Stage(int(make_divisible(w_bot, g) / bottleneck_multiplier), d, g))
  return out


class BottleneckTransform(nn.Module):
  """RegNet's ``f``: 1x1 ``a``, 3x3 grouped ``b`` (stride), [``se``], 1x1 ``c`` (no activation)."""
  features: int
  stride: int
  group_width: int
  se_ratio: float | None = None
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layer = partial(conv_norm_act, train=train, activation=nn.relu, conv=self.conv, norm=self.norm)
    width = self.features  # torchvision's bottleneck multiplier is 1 for every RegNet
    y = layer(x, width, 1, name='a')
    y = layer(y, width, 3, self.stride, groups=width // self.group_width, name='b')
    if self.se_ratio:
      y = SqueezeExcitation(int(round(self.se_ratio * x.shape[-1])),
                            conv=partial(self.conv, use_bias=True), name='se')(y)
    return layer(y, self.features, 1, activation=None, name='c')


class ResBottleneckBlock(nn.Module):
  """``relu(proj(x) + f(x))``; ``proj`` (1x1 conv + BN) only when the shape changes."""
  features: int
  stride: int
  group_width: int
  se_ratio: float | None = None
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = BottleneckTransform(self.features, self.stride, self.group_width, self.se_ratio,
                            conv=self.conv, norm=self.norm, name='f')(x, train)
    if x.shape[-1] != self.features or self.stride != 1:
      x = conv_norm_act(x, self.features, 1, self.stride, activation=None, name='proj',
                        train=train, conv=self.conv, norm=self.norm)
    return nn.relu(x + y)


class AnyStage(nn.Module):
  """``depth`` blocks named ``block{index}-{i}``, the first with stride 2."""
  stage: Stage
  index: int
  se_ratio: float | None = None
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.stage.depth):
      x = ResBottleneckBlock(self.stage.width, 2 if i == 0 else 1, self.stage.group_width,
                             self.se_ratio, conv=self.conv, norm=self.norm,
                             name=f'block{self.index}-{i}')(x, train)
    return x


class Trunk(nn.Module):
  """torchvision's ``trunk_output``: the stages ``block1`` ... ``block4``."""
  stages: tuple
  se_ratio: float | None = None
  conv: ModuleDef = ConvNoBias
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, stage in enumerate(self.stages, start=1):
      x = AnyStage(Stage(*stage), i, self.se_ratio, conv=self.conv, norm=self.norm,
                   name=f'block{i}')(x, train)
    return x


class RegNet(nn.Module):
  """RegNet from design parameters ``(depth, w_0, w_a, w_m, group_width)``; ``se_ratio`` 0.25
  makes it a RegNetY."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  depth: int = 22
  w_0: int = 24
  w_a: float = 24.48
  w_m: float = 2.54
  group_width: int = 16
  se_ratio: float | None = None
  stem_width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'RegNet', self.in_channels)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
                   bias_init=zeros)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name)
    stages = tuple(tuple(s) for s in block_params(self.depth, self.w_0, self.w_a, self.w_m,
                                                  self.group_width))
    x = conv_norm_act(x, self.stem_width, 3, 2, activation=nn.relu, name='stem', train=train,
                      conv=conv, norm=norm)
    x = Trunk(stages, self.se_ratio, conv=conv, norm=norm, name='trunk_output')(x, train)
    x = GlobalAvgPool()(x)
    fc = Linear(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                bias_init=zeros, name='fc')
    return fc(x).astype(jnp.float32)


def _x(depth, w_0, w_a, w_m, group_width):
  return partial(RegNet, depth=depth, w_0=w_0, w_a=w_a, w_m=w_m, group_width=group_width)


def _y(depth, w_0, w_a, w_m, group_width):
  return partial(_x(depth, w_0, w_a, w_m, group_width), se_ratio=0.25)


# torchvision's design parameters (depth, w_0, w_a, w_m, group_width), from the paper's tables.
REGNETS = {
    'regnet_y_400mf': _y(16, 48, 27.89, 2.09, 8),
    'regnet_y_800mf': _y(14, 56, 38.84, 2.4, 16),
    'regnet_y_1_6gf': _y(27, 48, 20.71, 2.65, 24),
    'regnet_y_3_2gf': _y(21, 80, 42.63, 2.66, 24),
    'regnet_y_8gf': _y(17, 192, 76.82, 2.19, 56),
    'regnet_y_16gf': _y(18, 200, 106.23, 2.48, 112),
    'regnet_y_32gf': _y(20, 232, 115.89, 2.53, 232),
    'regnet_y_128gf': _y(27, 456, 160.83, 2.52, 264),
    'regnet_x_400mf': _x(22, 24, 24.48, 2.54, 16),
    'regnet_x_800mf': _x(16, 56, 35.73, 2.28, 16),
    'regnet_x_1_6gf': _x(18, 80, 34.01, 2.25, 24),
    'regnet_x_3_2gf': _x(25, 88, 26.31, 2.25, 48),
    'regnet_x_8gf': _x(23, 80, 49.56, 2.88, 120),
    'regnet_x_16gf': _x(22, 216, 55.59, 2.1, 128),
    'regnet_x_32gf': _x(23, 320, 69.86, 2.0, 168),
}
