"""AlexNet exactly as torchvision builds it (61,100,840 parameters with 1000 classes).

Names are torchvision's Sequential indices: ``features_0``, ``features_3``, ``features_6``,
``features_8``, ``features_10`` (convs; pools at 2, 5, 12) and ``classifier_1``,
``classifier_4``, ``classifier_6`` (linears; dropouts at 0, 3). An adaptive average pool to 6x6
precedes the classifier, so any input of at least 63x63 works.

Porting: ``classifier_1`` sees the 6x6x256 map flattened in NHWC order; torchvision flattened
NCHW, so its weight (4096, 256*6*6) must be reshaped to (4096, 256, 6, 6), transposed to
(6, 6, 256, 4096) and flattened to (9216, 4096).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers import Conv2d, Dropout, Linear, MaxPool2d, adaptive_avg_pool
from cnnjax.models.common import check_model_input


class AlexNet(nn.Module):
  """AlexNet (the "one weird trick" single-tower variant torchvision ships)."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'AlexNet', self.in_channels)
    # (index, features, kernel, stride, padding, max pool after?) of torchvision's `features`.
    convs = ((0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, False),
             (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, True))
    for index, features, kernel, stride, padding, pool in convs:
      x = Conv2d(features, kernel, stride, padding, dtype=self.dtype, name=f'features_{index}')(x)
      x = nn.relu(x)
      if pool:
        x = MaxPool2d(3, 2, name=f'features_{index + 2}')(x)
    x = adaptive_avg_pool(x, 6)
    x = x.reshape(x.shape[0], -1)
    x = Dropout(self.dropout, deterministic=not train)(x)
    x = nn.relu(Linear(4096, dtype=self.dtype, name='classifier_1')(x))
    x = Dropout(self.dropout, deterministic=not train)(x)
    x = nn.relu(Linear(4096, dtype=self.dtype, name='classifier_4')(x))
    return Linear(self.num_classes, dtype=self.dtype, name='classifier_6')(x).astype(jnp.float32)
