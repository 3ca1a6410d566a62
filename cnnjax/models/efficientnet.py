"""EfficientNet B0-B7 and V2 (s, m, l) exactly as torchvision builds them.

Stem 3x3 stride-2 conv + BN + SiLU, stages of MBConv (V2's first three: Fused-MBConv) blocks, a
1x1 conv to ``last_channel`` (B0-B7: 4x the last stage's channels; V2: 1280) + BN + SiLU, global
average pool, dropout, fc. The stochastic-depth rate grows linearly with the block index,
``stochastic_depth_prob * i / num_blocks``. B1-B7 scale B0's channels by ``width_mult``
(rounded to multiples of 8) and its block counts by ``depth_mult`` (rounded up), with
torchvision's dropout per size (0.2 ... 0.5); B5-B7 use BN eps 1e-3 and torch momentum 0.01
(Flax 0.99), V2 eps 1e-3, as torchvision does for its weights.

Names are torchvision's: ``features_0_0``/``features_0_1`` (stem conv/BN),
``features_{stage}_{block}`` (an MBConv or FusedMBConv, see cnnjax.blocks),
``features_{n+1}_0``/``_1`` (head conv/BN) and ``classifier_1`` (dropout is index 0).
Initialization is torchvision's: Kaiming-normal fan_out convs with zero bias, BN 1/0, linear
U(+-1/sqrt(num_classes)) with zero bias.
"""
from __future__ import annotations

from functools import partial
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import FusedMBConv, MBConv, conv_norm_act, make_divisible
from cnnjax.layers import BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear, uniform_init
from cnnjax.models.common import check_model_input, kaiming_normal_fan_out, zeros

# (block, expand_ratio, kernel, stride, in_channels, out_channels, num_blocks).
# B0: Table 1 of the EfficientNet paper; V2: Table 4 of the EfficientNetV2 paper (torchvision's).
B0_STAGES = (
    ('mbconv', 1, 3, 1, 32, 16, 1),
    ('mbconv', 6, 3, 2, 16, 24, 2),
    ('mbconv', 6, 5, 2, 24, 40, 2),
    ('mbconv', 6, 3, 2, 40, 80, 3),
    ('mbconv', 6, 5, 1, 80, 112, 3),
    ('mbconv', 6, 5, 2, 112, 192, 4),
    ('mbconv', 6, 3, 1, 192, 320, 1),
)
V2_S_STAGES = (
    ('fused', 1, 3, 1, 24, 24, 2), ('fused', 4, 3, 2, 24, 48, 4), ('fused', 4, 3, 2, 48, 64, 4),
    ('mbconv', 4, 3, 2, 64, 128, 6), ('mbconv', 6, 3, 1, 128, 160, 9),
    ('mbconv', 6, 3, 2, 160, 256, 15),
)
V2_M_STAGES = (
    ('fused', 1, 3, 1, 24, 24, 3), ('fused', 4, 3, 2, 24, 48, 5), ('fused', 4, 3, 2, 48, 80, 5),
    ('mbconv', 4, 3, 2, 80, 160, 7), ('mbconv', 6, 3, 1, 160, 176, 14),
    ('mbconv', 6, 3, 2, 176, 304, 18), ('mbconv', 6, 3, 1, 304, 512, 5),
)
V2_L_STAGES = (
    ('fused', 1, 3, 1, 32, 32, 4), ('fused', 4, 3, 2, 32, 64, 7), ('fused', 4, 3, 2, 64, 96, 7),
    ('mbconv', 4, 3, 2, 96, 192, 10), ('mbconv', 6, 3, 1, 192, 224, 19),
    ('mbconv', 6, 3, 2, 224, 384, 25), ('mbconv', 6, 3, 1, 384, 640, 7),
)
_BLOCKS = {'mbconv': MBConv, 'fused': FusedMBConv}


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
  stages: Sequence[Sequence[Any]] = B0_STAGES
  last_channel: int | None = None   # None: 4x the last stage's channels (B0-B7)
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9          # Flax's convention: 0.9 == torch's 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'EfficientNet', self.in_channels)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
                   bias_init=zeros)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name,
                   epsilon=self.bn_epsilon, momentum=self.bn_momentum)
    layer = partial(conv_norm_act, train=train, activation=nn.silu, conv=conv, norm=norm)
    stages = [(b, e, k, s, make_divisible(i * self.width_mult), make_divisible(o * self.width_mult),
               int(math.ceil(n * self.depth_mult))) for b, e, k, s, i, o, n in self.stages]
    x = layer(x, stages[0][4], 3, 2, name='features_0')
    total_blocks, block_id = sum(stage[-1] for stage in stages), 0
    for stage, (block, expand, kernel, stride, _, out, num_blocks) in enumerate(stages, start=1):
      for b in range(num_blocks):
        x = _BLOCKS[block](
            out, expand_ratio=expand, kernel_size=kernel, stride=stride if b == 0 else 1,
            stochastic_depth_prob=self.stochastic_depth_prob * block_id / total_blocks,
            conv=conv, norm=norm, name=f'features_{stage}_{b}')(x, train)
        block_id += 1
    x = layer(x, self.last_channel or 4 * stages[-1][5], 1, name=f'features_{len(stages) + 1}')
    x = GlobalAvgPool()(x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    bound = 1.0 / math.sqrt(self.num_classes)
    fc = Linear(self.num_classes, dtype=self.dtype, kernel_init=uniform_init(bound),
                bias_init=zeros, name='classifier_1')
    return fc(x).astype(jnp.float32)


_B5_NORM = dict(bn_epsilon=1e-3, bn_momentum=0.99)
EfficientNetB0 = partial(EfficientNet, width_mult=1.0, depth_mult=1.0, dropout=0.2)
EfficientNetB1 = partial(EfficientNet, width_mult=1.0, depth_mult=1.1, dropout=0.2)
EfficientNetB2 = partial(EfficientNet, width_mult=1.1, depth_mult=1.2, dropout=0.3)
EfficientNetB3 = partial(EfficientNet, width_mult=1.2, depth_mult=1.4, dropout=0.3)
EfficientNetB4 = partial(EfficientNet, width_mult=1.4, depth_mult=1.8, dropout=0.4)
EfficientNetB5 = partial(EfficientNet, width_mult=1.6, depth_mult=2.2, dropout=0.4, **_B5_NORM)
EfficientNetB6 = partial(EfficientNet, width_mult=1.8, depth_mult=2.6, dropout=0.5, **_B5_NORM)
EfficientNetB7 = partial(EfficientNet, width_mult=2.0, depth_mult=3.1, dropout=0.5, **_B5_NORM)
_V2 = partial(EfficientNet, last_channel=1280, bn_epsilon=1e-3)
EfficientNetV2S = partial(_V2, stages=V2_S_STAGES, dropout=0.2)
EfficientNetV2M = partial(_V2, stages=V2_M_STAGES, dropout=0.3)
EfficientNetV2L = partial(_V2, stages=V2_L_STAGES, dropout=0.4)
