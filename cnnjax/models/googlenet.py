"""GoogLeNet (Inception v1) as torchvision builds it, without the auxiliary classifiers.

6,624,904 parameters with 1000 classes, torchvision's ``googlenet(aux_logits=False)``. Every
conv is a ``BasicConv2d`` (conv without bias, BN eps 0.001, ReLU). The Inception modules'
"5x5" branch uses a 3x3 kernel as torchvision's does (see cnnjax.blocks.Inception).

Names are torchvision's: ``conv1``..``conv3`` (each with ``conv`` and ``bn`` inside),
``inception3a`` .. ``inception5b`` (with ``branch1``, ``branch2_0``, ``branch2_1``, ...),
``fc``; the max pools are ``maxpool1``..``maxpool4``. ``transform_input`` re-normalizes
ImageNet-normalized inputs as torchvision's pretrained GoogLeNet expects (off by default).
Works from 32x32 inputs up.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import BasicConv2d, Inception
from cnnjax.errors import ConfigError
from cnnjax.layers import BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear, MaxPool2d
from cnnjax.models.common import check_model_input

# (name, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj), in order; a max pool follows 3b, 4e.
_INCEPTIONS = (
    ('inception3a', 64, 96, 128, 16, 32, 32),
    ('inception3b', 128, 128, 192, 32, 96, 64),
    ('inception4a', 192, 96, 208, 16, 48, 64),
    ('inception4b', 160, 112, 224, 24, 64, 64),
    ('inception4c', 128, 128, 256, 24, 64, 64),
    ('inception4d', 112, 144, 288, 32, 64, 64),
    ('inception4e', 256, 160, 320, 32, 128, 128),
    ('inception5a', 256, 160, 320, 32, 128, 128),
    ('inception5b', 384, 192, 384, 48, 128, 128),
)


class GoogLeNet(nn.Module):
  """GoogLeNet; torchvision's init (convs and fc weights N(0, 0.01))."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  dropout: float = 0.2
  transform_input: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'GoogLeNet', self.in_channels)
    if self.transform_input and self.in_channels != 3:
      raise ConfigError(f'GoogLeNet transform_input needs 3 input channels, got {self.in_channels}.')
    if self.transform_input:  # ImageNet normalization -> the (x - 0.5) / 0.5 the weights saw.
      x = x * jnp.array([0.229, 0.224, 0.225]) / 0.5 + (jnp.array([0.485, 0.456, 0.406]) - 0.5) / 0.5
    init = nn.initializers.normal(0.01)
    block = partial(BasicConv2d,
                    conv=partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=init),
                    norm=partial(BatchNorm, epsilon=1e-3, dtype=self.dtype,
                                 axis_name=self.bn_axis_name))
    x = block(64, kernel_size=7, stride=2, padding=3, name='conv1')(x, train)
    x = MaxPool2d(3, 2, ceil_mode=True, name='maxpool1')(x)
    x = block(64, kernel_size=1, name='conv2')(x, train)
    x = block(192, kernel_size=3, padding=1, name='conv3')(x, train)
    x = MaxPool2d(3, 2, ceil_mode=True, name='maxpool2')(x)
    for name, *channels in _INCEPTIONS:
      x = Inception(*channels, conv_block=block, name=name)(x, train)
      if name == 'inception3b':
        x = MaxPool2d(3, 2, ceil_mode=True, name='maxpool3')(x)
      elif name == 'inception4e':
        x = MaxPool2d(2, 2, ceil_mode=True, name='maxpool4')(x)
    x = GlobalAvgPool()(x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    return Linear(self.num_classes, dtype=self.dtype, kernel_init=init,
                  name='fc')(x).astype(jnp.float32)
