"""SqueezeNet 1.0 and 1.1 exactly as torchvision builds them (1,248,424 / 1,235,496 parameters
with 1000 classes).

Fire modules (1x1 squeeze + ReLU, then 1x1 and 3x3 expands + ReLU, concatenated) between 3x3
stride-2 max pools (ceil_mode); the classifier is dropout 0.5 -> 1x1 conv to the classes ->
ReLU -> global average pool (no Linear layer). 1.1 has a 3x3 stem of 64 filters and pools
earlier: 2.4x less computation, the same accuracy.

Names are torchvision's: ``features_{i}`` (the stem conv ``features_0``, Fire modules with
``squeeze``, ``expand1x1``, ``expand3x3``), ``classifier_1`` (the final conv). Initialization is
torchvision's: Kaiming-uniform convs (fan_in, gain sqrt 2) with zero bias, the final conv
N(0, 0.01).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import ConfigError
from cnnjax.layers import Conv2d, Dropout, GlobalAvgPool, MaxPool2d
from cnnjax.models.common import check_model_input, zeros

ModuleDef = Any
kaiming_uniform = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')

# features index -> 'pool' | (squeeze, expand1x1, expand3x3); index 0 is the stem, 1 its ReLU.
_FIRES = {
    '1_0': (96, 7, {2: 'pool', 3: (16, 64, 64), 4: (16, 64, 64), 5: (32, 128, 128), 6: 'pool',
                    7: (32, 128, 128), 8: (48, 192, 192), 9: (48, 192, 192), 10: (64, 256, 256),
                    11: 'pool', 12: (64, 256, 256)}),
    '1_1': (64, 3, {2: 'pool', 3: (16, 64, 64), 4: (16, 64, 64), 5: 'pool', 6: (32, 128, 128),
                    7: (32, 128, 128), 8: 'pool', 9: (48, 192, 192), 10: (48, 192, 192),
                    11: (64, 256, 256), 12: (64, 256, 256)}),
}


class Fire(nn.Module):
  """SqueezeNet's Fire module: squeeze (1x1) -> [expand1x1, expand3x3], ReLUs, concatenated."""
  squeeze_planes: int
  expand1x1_planes: int
  expand3x3_planes: int
  conv: ModuleDef = Conv2d

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(self.conv(self.squeeze_planes, kernel_size=1, name='squeeze')(x))
    return jnp.concatenate([
        nn.relu(self.conv(self.expand1x1_planes, kernel_size=1, name='expand1x1')(x)),
        nn.relu(self.conv(self.expand3x3_planes, kernel_size=3, padding=1, name='expand3x3')(x)),
    ], axis=-1)


class SqueezeNet(nn.Module):
  """SqueezeNet ``version`` '1_0' or '1_1'; see the module docstring."""
  num_classes: int = 1000
  in_channels: int = 3
  dtype: Any = jnp.float32
  version: str = '1_0'
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'SqueezeNet', self.in_channels)
    if self.version not in _FIRES:
      raise ConfigError(f"SqueezeNet version must be '1_0' or '1_1', got {self.version!r}.")
    conv = partial(Conv2d, dtype=self.dtype, kernel_init=kaiming_uniform, bias_init=zeros)
    stem, kernel, layers = _FIRES[self.version]
    x = nn.relu(conv(stem, kernel_size=kernel, stride=2, name='features_0')(x))
    for index, spec in layers.items():
      if spec == 'pool':
        x = MaxPool2d(3, 2, ceil_mode=True, name=f'features_{index}')(x)
      else:
        x = Fire(*spec, conv=conv, name=f'features_{index}')(x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    x = conv(self.num_classes, kernel_size=1, kernel_init=nn.initializers.normal(0.01),
             name='classifier_1')(x)
    return GlobalAvgPool()(nn.relu(x)).astype(jnp.float32)


SqueezeNet1_0 = partial(SqueezeNet, version='1_0')
SqueezeNet1_1 = partial(SqueezeNet, version='1_1')
