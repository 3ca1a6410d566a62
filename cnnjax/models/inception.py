"""Inception v3 as torchvision builds it, with its auxiliary classifier ``AuxLogits``.

27,161,264 parameters with 1000 classes, torchvision's documented count; ``aux_logits=False``
leaves the head out (23,834,568, torchvision's ``inception_v3(aux_logits=False)``). The head
(`InceptionAux`: 5x5/3 average pool, 1x1 conv to 128, 5x5 conv to 768, global pool, fc) reads
the 17x17 ``Mixed_6e`` maps and runs only in training, where its logits are sown into the
``aux_logits`` collection as ``AuxLogits/logits``: cnnjax/train.py adds ``train.aux_loss_weight``
times their cross-entropy to the loss (torchvision's recipe: ``loss(out) + 0.4 * loss(aux)``).
At init its parameters are created on a zero 17x17 map, so they exist whatever the input size,
and an evaluation never computes it. Training with the head needs 17x17 ``Mixed_6e`` maps, i.e.
inputs of at least 299x299 as in torchvision; smaller inputs train with ``aux_logits=False``.

Every conv is a ``BasicConv2d`` (no bias, BN eps 0.001, ReLU): a stem of five convs and two 3x3
stride-2 max pools, then Inception modules A (x3, 5b-5d), B (6a, grid reduction), C (x4,
factorized 7x7: 1x7 and 7x1), D (7a, reduction) and E (x2, split 1x3 / 3x1 branches), global
average pool, dropout 0.5, fc. Inputs of at least 75x75 (299x299 for the pretrained weights). ``transform_input`` re-normalizes
ImageNet-normalized inputs as torchvision's pretrained model expects (off by default).

Names are torchvision's: ``Conv2d_1a_3x3`` ... ``Conv2d_4a_3x3``, ``Mixed_5b`` ... ``Mixed_7c``
(with ``branch1x1``, ``branch5x5_1``, ... each holding ``conv`` and ``bn``), ``AuxLogits``
(``conv0``, ``conv1``, ``fc``), ``fc``. Initialization is torchvision's: truncated normal convs
and fcs (std 0.1; the head's conv1 0.01 and fc 0.001), BN 1/0.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.blocks import BasicConv2d
from cnnjax.errors import ConfigError, ShapeError
from cnnjax.layers import AvgPool2d, BatchNorm, Conv2d, Dropout, GlobalAvgPool, Linear, MaxPool2d
from cnnjax.models.common import check_model_input

ModuleDef = Any


def _pool(x):
  return AvgPool2d(3, stride=1, padding=1)(x)


class InceptionA(nn.Module):
  pool_features: int
  block: ModuleDef = BasicConv2d

  @nn.compact
  def __call__(self, x, train=False):
    b = self.block
    b1 = b(64, name='branch1x1')(x, train)
    b5 = b(64, 5, padding=2, name='branch5x5_2')(b(48, name='branch5x5_1')(x, train), train)
    b3 = b(64, name='branch3x3dbl_1')(x, train)
    b3 = b(96, 3, padding=1, name='branch3x3dbl_2')(b3, train)
    b3 = b(96, 3, padding=1, name='branch3x3dbl_3')(b3, train)
    bp = b(self.pool_features, name='branch_pool')(_pool(x), train)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  block: ModuleDef = BasicConv2d

  @nn.compact
  def __call__(self, x, train=False):
    b = self.block
    b3 = b(384, 3, stride=2, name='branch3x3')(x, train)
    bd = b(64, name='branch3x3dbl_1')(x, train)
    bd = b(96, 3, padding=1, name='branch3x3dbl_2')(bd, train)
    bd = b(96, 3, stride=2, name='branch3x3dbl_3')(bd, train)
    return jnp.concatenate([b3, bd, MaxPool2d(3, 2)(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  block: ModuleDef = BasicConv2d

  @nn.compact
  def __call__(self, x, train=False):
    b, c7 = self.block, self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    b1 = b(192, name='branch1x1')(x, train)
    b7 = b(c7, name='branch7x7_1')(x, train)
    b7 = b(c7, **row, name='branch7x7_2')(b7, train)
    b7 = b(192, **col, name='branch7x7_3')(b7, train)
    bd = b(c7, name='branch7x7dbl_1')(x, train)
    for i, (features, shape) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
      bd = b(features, **shape, name=f'branch7x7dbl_{i}')(bd, train)
    bp = b(192, name='branch_pool')(_pool(x), train)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  block: ModuleDef = BasicConv2d

  @nn.compact
  def __call__(self, x, train=False):
    b = self.block
    b3 = b(320, 3, stride=2, name='branch3x3_2')(b(192, name='branch3x3_1')(x, train), train)
    b7 = b(192, name='branch7x7x3_1')(x, train)
    b7 = b(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7, train)
    b7 = b(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7, train)
    b7 = b(192, 3, stride=2, name='branch7x7x3_4')(b7, train)
    return jnp.concatenate([b3, b7, MaxPool2d(3, 2)(x)], axis=-1)


class InceptionE(nn.Module):
  block: ModuleDef = BasicConv2d

  @nn.compact
  def __call__(self, x, train=False):
    b = self.block
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    b1 = b(320, name='branch1x1')(x, train)
    b3 = b(384, name='branch3x3_1')(x, train)
    b3 = jnp.concatenate([b(384, **row, name='branch3x3_2a')(b3, train),
                          b(384, **col, name='branch3x3_2b')(b3, train)], axis=-1)
    bd = b(448, name='branch3x3dbl_1')(x, train)
    bd = b(384, 3, padding=1, name='branch3x3dbl_2')(bd, train)
    bd = jnp.concatenate([b(384, **row, name='branch3x3dbl_3a')(bd, train),
                          b(384, **col, name='branch3x3dbl_3b')(bd, train)], axis=-1)
    bp = b(192, name='branch_pool')(_pool(x), train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


AUX_MAP = 17  # the Mixed_6e side InceptionAux reads: 17 -> 5 (pool 5/3) -> 1 (conv 5x5)


class InceptionAux(nn.Module):
  """torchvision's ``InceptionAux`` on (N, 17, 17, 768) maps: (N, num_classes) logits, also
  sown in training as ``aux_logits/logits``."""
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    if min(x.shape[1:3]) < AUX_MAP:
      raise ShapeError(f'InceptionV3\'s AuxLogits head needs Mixed_6e maps of at least '
                       f'{AUX_MAP}x{AUX_MAP} (inputs of at least 299x299), got '
                       f'{x.shape[1]}x{x.shape[2]}; build it with aux_logits=False to train on '
                       f'smaller inputs.')
    x = AvgPool2d(5, stride=3)(x)
    x = BasicConv2d(128, conv=self.conv, norm=self.norm, name='conv0')(x, train)
    conv1 = partial(self.conv, kernel_init=nn.initializers.truncated_normal(0.01))
    x = BasicConv2d(768, 5, conv=conv1, norm=self.norm, name='conv1')(x, train)
    x = GlobalAvgPool()(x)
    x = Linear(self.num_classes, dtype=self.dtype,
               kernel_init=nn.initializers.truncated_normal(0.001), name='fc')(x)
    if train:  # to the loss (cnnjax/train.py), as aux_logits/AuxLogits/logits
      self.sow('aux_logits', 'logits', x.astype(jnp.float32))
    return x


class InceptionV3(nn.Module):
  """Inception v3; see the module docstring for the layout and names."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  dropout: float = 0.5
  transform_input: bool = False
  aux_logits: bool = True  # torchvision's default: the AuxLogits head (see the module docstring)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'InceptionV3', self.in_channels)
    if self.transform_input and self.in_channels != 3:
      raise ConfigError(f'InceptionV3 transform_input needs 3 input channels, got '
                        f'{self.in_channels}.')
    if self.transform_input:  # ImageNet normalization -> the (x - 0.5) / 0.5 the weights saw.
      x = x * jnp.array([0.229, 0.224, 0.225]) / 0.5 + (jnp.array([0.485, 0.456, 0.406]) - 0.5) / 0.5
    init = nn.initializers.truncated_normal(0.1)
    conv = partial(Conv2d, use_bias=False, dtype=self.dtype, kernel_init=init)
    norm = partial(BatchNorm, epsilon=1e-3, dtype=self.dtype, axis_name=self.bn_axis_name)
    b = partial(BasicConv2d, conv=conv, norm=norm)
    x = b(32, 3, stride=2, name='Conv2d_1a_3x3')(x, train)
    x = b(32, 3, name='Conv2d_2a_3x3')(x, train)
    x = b(64, 3, padding=1, name='Conv2d_2b_3x3')(x, train)
    x = MaxPool2d(3, 2, name='maxpool1')(x)
    x = b(80, 1, name='Conv2d_3b_1x1')(x, train)
    x = b(192, 3, name='Conv2d_4a_3x3')(x, train)
    x = MaxPool2d(3, 2, name='maxpool2')(x)
    for name, features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(features, b, name=name)(x, train)
    x = InceptionB(b, name='Mixed_6a')(x, train)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, b, name=name)(x, train)
    if self.aux_logits:
      head = InceptionAux(self.num_classes, conv, norm, self.dtype, name='AuxLogits')
      if train and not self.is_initializing():
        head(x, train)  # sows its logits
      elif self.is_initializing():  # its parameters, whatever the input size; unused outputs
        head(jnp.zeros((1, AUX_MAP, AUX_MAP, x.shape[-1]), x.dtype), False)
    x = InceptionD(b, name='Mixed_7a')(x, train)
    x = InceptionE(b, name='Mixed_7b')(x, train)
    x = InceptionE(b, name='Mixed_7c')(x, train)
    x = GlobalAvgPool()(x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    return Linear(self.num_classes, dtype=self.dtype, kernel_init=init,
                  name='fc')(x).astype(jnp.float32)
