"""LeNet-5 (LeCun et al., 1998) as it is usually reproduced: tanh and average pooling.

On 28x28 MNIST digits: conv1 1->6 k5 pad 2 (28x28), tanh, 2x2 avg pool (14x14), conv2 6->16 k5
(10x10), tanh, 2x2 avg pool (5x5), fc1 400->120, fc2 120->84, fc3 84->10, tanh between the fully
connected layers: 61,706 parameters. Names: conv1, conv2, fc1, fc2, fc3. fc1 sees an NHWC
flatten (see cnnjax/models/common.py on porting PyTorch weights).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers import AvgPool2d, Conv2d, Linear
from cnnjax.models.common import check_model_input


class LeNet5(nn.Module):
  """Classic LeNet-5 for 28x28 single-channel images."""
  num_classes: int = 10
  in_channels: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'lenet5', self.in_channels)
    x = AvgPool2d(2)(jnp.tanh(Conv2d(6, 5, padding=2, dtype=self.dtype, name='conv1')(x)))
    x = AvgPool2d(2)(jnp.tanh(Conv2d(16, 5, dtype=self.dtype, name='conv2')(x)))
    x = x.reshape(x.shape[0], -1)
    x = jnp.tanh(Linear(120, dtype=self.dtype, name='fc1')(x))
    x = jnp.tanh(Linear(84, dtype=self.dtype, name='fc2')(x))
    return Linear(self.num_classes, dtype=self.dtype, name='fc3')(x).astype(jnp.float32)
