"""What every model in the zoo shares: input validation, torchvision's initializers, rounding.

The naming scheme all models follow (so a torchvision ``state_dict`` maps by string rewriting):

* a torchvision module path keeps its names; a ``Sequential`` index joins its container with an
  underscore: ``layer1.0`` -> ``layer1_0``, ``features.0`` -> ``features_0``,
  ``layer1.0.downsample.1`` -> ``layer1_0/downsample_1``,
  ``features.1.0.block.0.0`` -> ``features_1_0/block_0_0``;
* every other dot becomes a Flax scope separator ``/``;
* the leaf: a ``Conv2d`` weight/bias is ``<name>/kernel|bias`` (HWIO: torch's OIHW weight
  ``.transpose(2, 3, 1, 0)``), a ``Linear`` weight/bias is ``<name>/kernel|bias`` (kernel is
  torch's weight transposed), a ``BatchNorm`` weight/bias is ``<name>/scale|bias`` in ``params``
  and its running_mean/running_var are ``<name>/mean|var`` in ``batch_stats``.

In regex form: ``re.sub(r'\\.(\\d+)', r'_\\1', key)`` then ``.`` -> ``/``: `module_path`, used by
`cnnjax.torchvision_weights` to port state_dicts and by `cnnjax.models.activations` to accept
torchvision's names.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax

from cnnjax.errors import ShapeError

# torchvision's ``kaiming_normal_(w, mode='fan_out', nonlinearity='relu')`` (an untruncated
# normal). Flax's fan_out of an HWIO kernel is kh * kw * out, the same as torch's for OIHW.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
zeros = nn.initializers.zeros


def module_path(torch_module: str) -> str:
  """'layer1.0.downsample.0' -> 'layer1_0/downsample_0': a torchvision module name as the Flax
  path of the same module here (a cnnjax path passes through unchanged)."""
  return re.sub(r'\.(\d+)', r'_\1', torch_module).replace('.', '/')


def check_model_input(x: jax.Array, model: str, in_channels: int) -> None:
  """Raises a ValueError unless ``x`` is an NHWC batch with ``in_channels`` channels."""
  if x.ndim != 4 or x.shape[-1] != in_channels:
    raise ShapeError(f'{model} expects input of shape (N, H, W, {in_channels}), '
                     f'got {tuple(x.shape)}.')

