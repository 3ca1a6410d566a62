"""The torchvision zoo beyond the classic nets: one representative of every family against
torchvision with copied weights (eval and train mode, small inputs), and options errors.

Parameter counts of every size and the state_dict name maps are checked in test_models.py and
test_torchvision_parity.py (shapes only, through jax.eval_shape and torch's meta device).
"""
from __future__ import annotations

import numpy as np
import pytest

from cnnjax.errors import ConfigError
from cnnjax.models import get_model
from torch_compare import compare, import_torch, random_input


def _torchvision(name, **kwargs):
  import_torch()
  import torch
  import torchvision.models as tvm
  torch.manual_seed(0)
  return getattr(tvm, name)(**kwargs)


def test_resnext_matches_torchvision():
  # 64x64: at 32x32 the last stage is 1x1, and batch statistics over 2 values are ill-conditioned.
  compare(_torchvision('resnext50_32x4d', num_classes=10), get_model('resnext50_32x4d', 10),
          random_input((2, 64, 64, 3)))
  # wide_resnet*: the same Bottleneck with groups=1; its shapes are checked against torchvision's
  # in test_models.py (a forward here would cost another compile and test nothing new).


def test_grouped_width_needs_bottleneck_blocks():
  import jax
  import jax.numpy as jnp
  model = get_model('resnet18', groups=32, width_per_group=4)
  with pytest.raises(ConfigError, match='need Bottleneck blocks'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
