"""EfficientNet (B0 by default) exactly as torchvision builds it (B0: 5,288,548 parameters).

Stem 3x3 stride-2 conv + BN + SiLU (32 channels), seven stages of MBConv blocks, a 1x1 conv to
4 x 320 = 1280 channels + BN + SiLU, global average pool, dropout, fc. The stochastic-depth
rate grows linearly with the block index, ``0.2 * i / 16`` for the 16 blocks of B0.
``width_mult``/``depth_mult`` scale channels (rounded to multiples of 8) and block counts like
torchvision's B1-B7 (but note torchvision's B1+ differ in more than these two numbers).

Names are torchvision's: ``features_0_0``/``features_0_1`` (stem conv/BN),
``features_{stage}_{block}`` (an MBConv, see cnnjax.blocks.MBConv),
``features_8_0``/``features_8_1`` (head conv/BN) and ``classifier_1`` (dropout is index 0).
Initialization is torchvision's: Kaiming-normal fan_out convs with zero bias, BN 1/0, linear
U(+-1/sqrt(num_classes)) with zero bias.
"""
from __future__ import annotations

from functools import partial
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import MBConv, conv_norm_act, make_divisible
from cnnjax.layers import BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear, uniform_init
from cnnjax.models.common import check_model_input, kaiming_normal_fan_out, zeros

# (expand_ratio, kernel, stride, in_channels, out_channels, num_blocks): Table 1 of the paper.
_B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class EfficientNet(nn.Module):
  """EfficientNet; see the module docstring for the layout and names."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  width_mult: float = 1.0
  depth_mult: float = 1.0
  dropout: float = 0.2
  stochastic_depth_prob: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'EfficientNet', self.in_channels)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
                   bias_init=zeros)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name)
    layer = partial(conv_norm_act, train=train, activation=nn.silu, conv=conv, norm=norm)
    stages = [(e, k, s, make_divisible(i * self.width_mult), make_divisible(o * self.width_mult),
               int(math.ceil(n * self.depth_mult))) for e, k, s, i, o, n in _B0_STAGES]
    x = layer(x, stages[0][3], 3, 2, name='features_0')
    total_blocks, block_id = sum(stage[-1] for stage in stages), 0
    for stage, (expand, kernel, stride, _, out, num_blocks) in enumerate(stages, start=1):
      for b in range(num_blocks):
        x = MBConv(out, expand_ratio=expand, kernel_size=kernel, stride=stride if b == 0 else 1,
                   stochastic_depth_prob=self.stochastic_depth_prob * block_id / total_blocks,
                   conv=conv, norm=norm, name=f'features_{stage}_{b}')(x, train)
        block_id += 1
    x = layer(x, 4 * stages[-1][4], 1, name=f'features_{len(stages) + 1}')
    x = GlobalAvgPool()(x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    bound = 1.0 / math.sqrt(self.num_classes)
    fc = Linear(self.num_classes, dtype=self.dtype, kernel_init=uniform_init(bound),
                bias_init=zeros, name='classifier_1')
    return fc(x).astype(jnp.float32)


EfficientNetB0 = partial(EfficientNet, width_mult=1.0, depth_mult=1.0, dropout=0.2)
