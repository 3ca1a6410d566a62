"""VGG-11/13/16/19, with and without batch norm, exactly as torchvision builds them.

Names are torchvision's Sequential indices: convs, BNs and pools of ``features`` are
``features_{i}`` (a ReLU takes an index but has no module), the linears are ``classifier_0``,
``classifier_3`` and ``classifier_6``. An adaptive average pool to 7x7 precedes the classifier,
so 32x32 inputs work (the 1x1 map is replicated to 7x7, as in torchvision).

Initialization is torchvision's: convs Kaiming-normal (fan_out, ReLU) with zero bias, linears
N(0, 0.01) with zero bias.

Porting: ``classifier_0`` sees the 7x7x512 map flattened in NHWC order; torchvision flattened
NCHW, so its weight (4096, 512*7*7) must be reshaped to (4096, 512, 7, 7), transposed to
(7, 7, 512, 4096) and flattened to (25088, 4096).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import vgg_stage
from cnnjax.layers import BatchNorm, Conv2d, Dropout, Linear, adaptive_avg_pool
from cnnjax.models.common import check_model_input, kaiming_normal_fan_out, zeros


class VGG(nn.Module):
  """VGG: five stages of 3x3 convs (64, 128, 256, 512, 512) + max pools, then 3 linears."""
  stage_sizes: Sequence[int] = (2, 2, 3, 3, 3)
  batch_norm: bool = False
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'VGG', self.in_channels)
    conv = partial(Conv2d, dtype=self.dtype, kernel_init=kaiming_normal_fan_out, bias_init=zeros)
    norm = partial(BatchNorm, dtype=self.dtype, axis_name=self.bn_axis_name)
    index = 0
    for width, num_convs in zip(self.widths, self.stage_sizes):
      x, index = vgg_stage(x, width, num_convs, index=index, train=train,
                           batch_norm=self.batch_norm, conv=conv, norm=norm)
    x = adaptive_avg_pool(x, 7)
    x = x.reshape(x.shape[0], -1)
    linear = partial(Linear, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                     bias_init=zeros)
    x = nn.relu(linear(4096, name='classifier_0')(x))
    x = Dropout(self.dropout, deterministic=not train)(x)
    x = nn.relu(linear(4096, name='classifier_3')(x))
    x = Dropout(self.dropout, deterministic=not train)(x)
    return linear(self.num_classes, name='classifier_6')(x).astype(jnp.float32)


VGG11 = partial(VGG, stage_sizes=(1, 1, 2, 2, 2))
VGG13 = partial(VGG, stage_sizes=(2, 2, 2, 2, 2))
VGG16 = partial(VGG, stage_sizes=(2, 2, 3, 3, 3))
VGG19 = partial(VGG, stage_sizes=(2, 2, 4, 4, 4))
VGG11BN = partial(VGG11, batch_norm=True)
VGG13BN = partial(VGG13, batch_norm=True)
VGG16BN = partial(VGG16, batch_norm=True)
VGG19BN = partial(VGG19, batch_norm=True)
