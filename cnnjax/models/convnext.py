"""ConvNeXt tiny, small, base and large exactly as torchvision builds them.

Stem: 4x4 stride-4 conv (bias) + LayerNorm over channels. Four stages of ConvNeXt blocks
(7x7 depthwise conv -> LayerNorm -> Linear to 4x -> GELU -> Linear back -> times a learned
per-channel ``layer_scale`` (initialized to 1e-6) -> stochastic depth -> + input), with
LayerNorm + 2x2 stride-2 conv downsampling between them; global average pool, LayerNorm, fc.
LayerNorm eps is 1e-6. The stochastic-depth rate grows linearly from 0 to
``stochastic_depth_prob`` (torchvision's 0.1 / 0.4 / 0.5 / 0.5) over all blocks.

Names are torchvision's: ``features_0_0``/``features_0_1`` (stem conv/LN), ``features_{2s+1}_{i}``
(a block: ``block_0`` dwconv, ``block_2`` LN, ``block_3``/``block_5`` Linear, ``layer_scale``),
``features_{2s}_0``/``_1`` (downsampling LN/conv), ``classifier_0`` (LN), ``classifier_2`` (fc).
Initialization is torchvision's: truncated-normal (std 0.02) conv and linear weights, zero
biases.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import drop_path
from cnnjax.layers import Conv2d, GlobalAvgPool, Linear
from cnnjax.models.common import check_model_input, zeros

ModuleDef = Any
trunc_normal = nn.initializers.truncated_normal(0.02)


class ConvNeXtBlock(nn.Module):
  """torchvision's ``CNBlock``; parameters ``layer_scale`` (C,) and block_0/2/3/5."""
  layer_scale: float = 1e-6
  stochastic_depth_prob: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    linear = partial(Linear, dtype=self.dtype, kernel_init=trunc_normal, bias_init=zeros)
    y = Conv2d(dim, kernel_size=7, padding=3, groups=dim, dtype=self.dtype,
               kernel_init=trunc_normal, bias_init=zeros, name='block_0')(x)
    y = layer_norm(name='block_2', dtype=self.dtype)(y)
    y = nn.gelu(linear(4 * dim, name='block_3')(y), approximate=False)
    y = linear(dim, name='block_5')(y)
    scale = self.param('layer_scale', nn.initializers.constant(self.layer_scale), (dim,))
    y = y * scale.astype(y.dtype)
    return drop_path(self, y, self.stochastic_depth_prob, train) + x


def layer_norm(name: str, dtype: Any = jnp.float32) -> nn.LayerNorm:
  """torchvision's ConvNeXt LayerNorm (eps 1e-6) over the channels; params ``scale``, ``bias``."""
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False, name=name)


class ConvNeXt(nn.Module):
  """ConvNeXt with ``stages`` of (channels, num_blocks); see the module docstring."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  stages: Sequence[Sequence[int]] = ((96, 3), (192, 3), (384, 9), (768, 3))
  stochastic_depth_prob: float = 0.1
  layer_scale: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'ConvNeXt', self.in_channels)
    conv = partial(Conv2d, dtype=self.dtype, kernel_init=trunc_normal, bias_init=zeros)
    x = conv(self.stages[0][0], kernel_size=4, stride=4, name='features_0_0')(x)
    x = layer_norm('features_0_1', self.dtype)(x)
    total, block_id = sum(n for _, n in self.stages), 0
    for s, (_, num_blocks) in enumerate(self.stages):
      for i in range(num_blocks):
        rate = self.stochastic_depth_prob * block_id / max(total - 1.0, 1.0)
        x = ConvNeXtBlock(self.layer_scale, rate, self.dtype,
                          name=f'features_{2 * s + 1}_{i}')(x, train)
        block_id += 1
      if s + 1 < len(self.stages):
        x = layer_norm(f'features_{2 * s + 2}_0', self.dtype)(x)
        x = conv(self.stages[s + 1][0], kernel_size=2, stride=2, name=f'features_{2 * s + 2}_1')(x)
    x = layer_norm('classifier_0', self.dtype)(GlobalAvgPool()(x))
    fc = Linear(self.num_classes, dtype=self.dtype, kernel_init=trunc_normal, bias_init=zeros,
                name='classifier_2')
    return fc(x).astype(jnp.float32)


ConvNeXtTiny = partial(ConvNeXt, stages=((96, 3), (192, 3), (384, 9), (768, 3)),
                       stochastic_depth_prob=0.1)
ConvNeXtSmall = partial(ConvNeXt, stages=((96, 3), (192, 3), (384, 27), (768, 3)),
                        stochastic_depth_prob=0.4)
ConvNeXtBase = partial(ConvNeXt, stages=((128, 3), (256, 3), (512, 27), (1024, 3)),
                       stochastic_depth_prob=0.5)
ConvNeXtLarge = partial(ConvNeXt, stages=((192, 3), (384, 3), (768, 27), (1536, 3)),
                        stochastic_depth_prob=0.5)
