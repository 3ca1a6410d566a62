"""cnnjax.blocks against torchvision's own blocks, with weights copied by name.

The copy uses only the naming rule documented in cnnjax/models/common.py (Sequential indices
joined by '_', other dots become scopes), so these tests check structure, numerics and names.
"""
from __future__ import annotations

from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import blocks
from cnnjax.models.mobilenet import InvertedResidual

from torch_compare import ATOL, RTOL, compare, import_torch, init_key, random_input, torch_to_flax


@pytest.mark.parametrize('in_ch,planes,stride', [(8, 8, 1), (8, 16, 2)])
def test_basic_block_matches_torchvision(in_ch, planes, stride):
  torch = import_torch()
  from torchvision.models.resnet import BasicBlock, conv1x1
  downsample = None
  if stride != 1 or in_ch != planes:
    downsample = torch.nn.Sequential(conv1x1(in_ch, planes, stride), torch.nn.BatchNorm2d(planes))
  compare(BasicBlock(in_ch, planes, stride, downsample), blocks.BasicBlock(planes, stride),
          random_input((2, 8, 8, in_ch)))


def test_bottleneck_matches_torchvision():
  torch = import_torch()
  from torchvision.models.resnet import Bottleneck, conv1x1
  downsample = torch.nn.Sequential(conv1x1(8, 16, 2), torch.nn.BatchNorm2d(16))
  # torchvision v1.5: the stride sits on conv2 (3x3); a stride on conv1 would not match.
  compare(Bottleneck(8, 4, 2, downsample), blocks.Bottleneck(4, 2), random_input((2, 7, 7, 8)))


def test_zero_init_residual_makes_identity_blocks_start_as_relu():
  x = random_input((2, 4, 4, 8))
  block = blocks.BasicBlock(8, zero_init_residual=True)
  variables = jax.jit(block.init)(init_key(), x)
  chex.assert_trees_all_equal(variables['params']['bn2']['scale'], jnp.zeros(8))
  np.testing.assert_allclose(jax.jit(block.apply)(variables, x), np.maximum(x, 0), atol=1e-6)
  bottleneck = blocks.Bottleneck(4, stride=2, zero_init_residual=True)
  params = jax.eval_shape(bottleneck.init, jax.random.key(0), x)['params']
  assert set(params) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample_0',
                         'downsample_1'}


def test_inception_matches_torchvision():
  import_torch()
  from torchvision.models.googlenet import Inception
  channels = (4, 3, 6, 2, 5, 3)
  module = blocks.Inception(*channels)
  # An odd 7x7 map exercises the ceil_mode pool in branch4.
  compare(Inception(8, *channels), module, random_input((2, 7, 7, 8)))
  out = jax.eval_shape(module.init_with_output, jax.random.key(0), random_input((1, 7, 7, 8)))[0]
  assert out.shape == (1, 7, 7, 4 + 6 + 5 + 3)


@pytest.mark.parametrize('expand,kernel,stride,in_ch,out_ch', [(1, 3, 1, 8, 8), (6, 5, 2, 8, 16)])
def test_mbconv_matches_torchvision(expand, kernel, stride, in_ch, out_ch):
  torch = import_torch()
  from torchvision.models.efficientnet import MBConv, MBConvConfig
  config = MBConvConfig(expand, kernel, stride, in_ch, out_ch, 1)
  # p > 0 but eval mode: stochastic depth must be the identity in both frameworks.
  compare(MBConv(config, 0.5, torch.nn.BatchNorm2d),
          blocks.MBConv(out_ch, expand, kernel, stride, stochastic_depth_prob=0.5),
          random_input((2, 9, 9, in_ch)), train_too=False)


@pytest.mark.parametrize('expand,stride,in_ch,out_ch', [(1, 1, 8, 8), (6, 2, 8, 16)])
def test_inverted_residual_matches_torchvision(expand, stride, in_ch, out_ch):
  import_torch()
  from torchvision.models.mobilenetv2 import InvertedResidual as TorchInvertedResidual
  compare(TorchInvertedResidual(in_ch, out_ch, stride, expand),
          InvertedResidual(out_ch, stride, expand), random_input((2, 9, 9, in_ch)))


class _VGGStages(nn.Module):
  """Two VGG stages (8 and 16 channels) built with blocks.vgg_stage."""
  batch_norm: bool

  @nn.compact
  def __call__(self, x, train=False):
    x, index = blocks.vgg_stage(x, 8, 1, index=0, train=train, batch_norm=self.batch_norm)
    x, _ = blocks.vgg_stage(x, 16, 2, index=index, train=train, batch_norm=self.batch_norm)
    return x


@pytest.mark.parametrize('batch_norm', [False, True])
def test_vgg_stage_matches_torchvision_indices(batch_norm):
  torch = import_torch()
  from torchvision.models.vgg import make_layers
  wrapper = torch.nn.Module()
  wrapper.features = make_layers([8, 'M', 16, 16, 'M'], batch_norm=batch_norm)
  wrapper.forward = wrapper.features.forward
  compare(wrapper, _VGGStages(batch_norm), random_input((2, 8, 8, 3)))


def test_squeeze_excitation_matches_torchvision():
  torch = import_torch()
  from torchvision.ops import SqueezeExcitation
  torch_se = SqueezeExcitation(8, 3)
  x = random_input((2, 5, 5, 8))
  with torch.no_grad():
    expected = torch_se(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got = blocks.SqueezeExcitation(3).apply(torch_to_flax(torch_se), x)
  np.testing.assert_allclose(got, expected.transpose(0, 2, 3, 1), atol=ATOL, rtol=RTOL)


def test_stochastic_depth_is_torchvisions_row_mode():
  x = jnp.ones((4000, 2, 2, 3))
  chex.assert_trees_all_equal(blocks.stochastic_depth(x, 0.3, deterministic=True), x)
  out = np.asarray(blocks.stochastic_depth(x, 0.3, deterministic=False, rng=jax.random.key(0)))
  per_row = out.reshape(4000, -1)
  assert np.all(per_row == per_row[:, :1])                  # whole rows are kept or dropped
  np.testing.assert_allclose(np.unique(per_row), [0.0, 1 / 0.7], rtol=1e-6)
  assert abs((per_row[:, 0] == 0).mean() - 0.3) < 0.03
  with pytest.raises(ValueError, match='stochastic depth rate'):
    blocks.stochastic_depth(x, 1.5, deterministic=False, rng=jax.random.key(0))


def test_mbconv_stochastic_depth_uses_the_dropout_rng():
  x = random_input((8, 4, 4, 8))
  block = blocks.MBConv(8, 1.0, stochastic_depth_prob=1.0)   # residual branch always dropped
  variables = jax.jit(block.init)(init_key(), x)
  apply = jax.jit(partial(block.apply, train=True, mutable=['batch_stats']))
  out, _ = apply(variables, x, rngs={'dropout': jax.random.key(1)})
  np.testing.assert_allclose(out, x)
  with pytest.raises(Exception, match='dropout'):
    apply(variables, x)


def test_make_divisible_is_torchvisions():
  import_torch()
  from torchvision.models import _utils as torchvision_utils
  for value in (3.0, 15.9, 16 * 6, 32 * 1.1, 40 * 0.75, 1280 * 1.4):
    assert blocks.make_divisible(value) == torchvision_utils._make_divisible(value, 8)
