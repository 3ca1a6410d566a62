"""Three small CNNs: the PyTorch tutorial net and a conv+BN baseline (``convnet``) for CIFAR-sized
images, and the quickstart's digit net (``mnist_cnn``) for 28x28.

Flattening: ``tutorial_net`` and ``mnist_cnn`` flatten an NHWC feature map, so a ported PyTorch
``fc1`` weight (which saw an NCHW flatten) must have its input rows permuted from C,H,W to H,W,C
order (`cnnjax.torchvision_weights.nchw_rows_to_nhwc`); ``convnet`` pools globally instead.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers import BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear, MaxPool2d
from cnnjax.models.common import check_model_input


class TutorialNet(nn.Module):
  """The CIFAR-10 net of PyTorch's "Training a classifier" tutorial (62,006 params at 32x32).

  conv1 3->6 k5, ReLU, 2x2 max pool, conv2 6->16 k5, ReLU, 2x2 max pool, fc1 120, fc2 84, fc3.
  Names as in the tutorial: conv1, conv2, fc1, fc2, fc3.
  """
  num_classes: int = 10
  in_channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'tutorial_net', self.in_channels)
    x = MaxPool2d(2)(nn.relu(Conv2d(6, 5, dtype=self.dtype, name='conv1')(x)))
    x = MaxPool2d(2)(nn.relu(Conv2d(16, 5, dtype=self.dtype, name='conv2')(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(Linear(120, dtype=self.dtype, name='fc1')(x))
    x = nn.relu(Linear(84, dtype=self.dtype, name='fc2')(x))
    return Linear(self.num_classes, dtype=self.dtype, name='fc3')(x).astype(jnp.float32)


class ConvNet(nn.Module):
  """A small modern baseline: three 3x3 conv+BN+ReLU stages of 32, 64, 128 channels, 2x2 max
  pools after the first two, global average pool, fc 256 + ReLU, dropout 0.5, fc.

  Convolutions have no bias (BatchNorm's shift replaces it). Names: conv1..3, bn1..3, fc1, fc2.
  Works for any input of at least 4x4.
  """
  num_classes: int = 10
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  widths: tuple[int, ...] = (32, 64, 128)
  hidden: int = 256
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'convnet', self.in_channels)
    for i, width in enumerate(self.widths, start=1):
      x = Conv2d(width, 3, padding=1, use_bias=False, dtype=self.dtype, name=f'conv{i}')(x)
      x = BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name=f'bn{i}')(x, not train)
      x = nn.relu(x)
      if i < len(self.widths):
        x = MaxPool2d(2)(x)
    x = GlobalAvgPool()(x)
    x = nn.relu(Linear(self.hidden, dtype=self.dtype, name='fc1')(x))
    x = Dropout(self.dropout, deterministic=not train)(x)
    return Linear(self.num_classes, dtype=self.dtype, name='fc2')(x).astype(jnp.float32)


class MnistCNN(nn.Module):
  """The quickstart net, sized for 28x28 digits: two stages of 5x5 conv (16, then 32 channels,
  padding 2) + BN + ReLU + 2x2 max pool, then fc 128 + ReLU and fc. 215,418 parameters and
  3.0 M multiply-accumulates per 28x28 image, about 2.5x fewer than `convnet`.

  Names: conv1, bn1, conv2, bn2, fc1, fc2.
  """
  num_classes: int = 10
  in_channels: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  widths: tuple[int, ...] = (16, 32)
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'mnist_cnn', self.in_channels)
    for i, width in enumerate(self.widths, start=1):
      x = Conv2d(width, 5, padding=2, use_bias=False, dtype=self.dtype, name=f'conv{i}')(x)
      x = BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name=f'bn{i}')(x, not train)
      x = MaxPool2d(2)(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(Linear(self.hidden, dtype=self.dtype, name='fc1')(x))
    return Linear(self.num_classes, dtype=self.dtype, name='fc2')(x).astype(jnp.float32)
