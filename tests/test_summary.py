"""cnnjax.summary: rows, totals, MACs and receptive fields.

Receptive fields are checked against the gradient of a central output pixel with respect to the
input (its support *is* the receptive field); totals against parameter counts and the MACs that
torchvision publishes for its ImageNet models.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import layers as L
from cnnjax import shapes
from cnnjax.summary import summary


class Branchy(nn.Module):
  """A residual sum, a dilated branch and an Inception-like concatenation, in 8 layers."""
  features_only: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = L.Conv2d(4, 3, padding=1, name='stem')(x)              # rf 3, jump 1
    x = L.BatchNorm(use_running_average=not train, name='bn')(x)
    x = L.AvgPool2d(2, name='pool')(x)                          # rf 4, jump 2
    a = L.Conv2d(4, 3, padding=2, dilation=2, name='dilated')(x)  # rf 4 + 2*2*2 = 12
    b = L.Conv2d(4, 1, name='pointwise')(x)                     # rf 4
    x = x + a + b                                               # max over paths: 12
    x = L.Conv2d(6, 3, stride=2, padding=1, name='down')(x)     # rf 16, jump 4
    c = jnp.concatenate([L.Conv2d(3, 1, name='c1')(x),          # rf 16
                         L.Conv2d(3, 5, padding=2, name='c5')(x)], axis=-1)  # rf 32
    x = L.Dropout(0.5, deterministic=not train, name='drop')(c)
    if self.features_only:
      return x
    x = L.GlobalAvgPool(name='gap')(x)                          # whole 4x4 map: 32 + 3*4 = 44
    return L.Linear(5, name='head')(x)


EXPECTED_RF = {'stem': 3, 'bn': 3, 'pool': 4, 'dilated': 12, 'pointwise': 4, 'down': 16,
               'c1': 16, 'c5': 32, 'drop': 32, 'gap': 44, 'head': 44}


@pytest.fixture(scope='module')
def branchy():
  lines = []
  return summary(Branchy(), (16, 16, 3), print_fn=lines.append), lines


def test_rows_list_every_layer_in_call_order(branchy):
  result, _ = branchy
  assert [r.path for r in result.rows] == list(EXPECTED_RF)
  assert [r.type for r in result.rows] == [
      'Conv2d', 'BatchNorm', 'AvgPool2d', 'Conv2d', 'Conv2d', 'Conv2d', 'Conv2d', 'Conv2d',
      'Dropout', 'GlobalAvgPool', 'Linear']
  shapes_by_path = {r.path: r.output_shape for r in result.rows}
  assert shapes_by_path['stem'] == (1, 16, 16, 4)
  assert shapes_by_path['pool'] == (1, 8, 8, 4)
  assert shapes_by_path['down'] == (1, 4, 4, 6)
  assert shapes_by_path['drop'] == (1, 4, 4, 6)
  assert shapes_by_path['head'] == (1, 5)


def test_params_and_macs_follow_the_arithmetic(branchy):
  result, _ = branchy
  row = {r.path: r for r in result.rows}
  conv = [('stem', 3, 4, 3, 16, 1), ('dilated', 4, 4, 3, 8, 1), ('pointwise', 4, 4, 1, 8, 1),
          ('down', 4, 6, 3, 4, 1), ('c1', 6, 3, 1, 4, 1), ('c5', 6, 3, 5, 4, 1)]
  for name, cin, cout, k, size, groups in conv:
    assert row[name].params == shapes.conv_params(cin, cout, k, groups)
    assert row[name].macs == shapes.conv_macs(cin, cout, k, size, groups)
  assert row['bn'].params == shapes.batchnorm_params(4) and row['bn'].macs == 0
  assert row['head'].params == shapes.linear_params(6, 5)
  assert row['head'].macs == shapes.linear_macs(6, 5)
  assert result.total_macs == sum(r.macs for r in result.rows)


def test_total_params_equal_the_parameter_count(branchy):
  result, _ = branchy
  variables = jax.eval_shape(Branchy().init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  count = sum(math.prod(p.shape) for p in jax.tree.leaves(variables['params']))
  assert result.total_params == count == sum(r.params for r in result.rows)
  assert result.other_params == 0
  assert result.batch_stats == 8


def test_printed_table(branchy):
  result, lines = branchy
  assert lines == [str(result)]
  text = lines[0]
  for r in result.rows:
    assert r.path in text
  assert f'Total params: {result.total_params:,}' in text
  assert f'Total MACs: {result.total_macs:,}' in text
  stem = next(line for line in text.splitlines() if line.startswith('stem '))
  assert stem.split()[-2:] == ['3', '1'] and '(1, 16, 16, 4)' in stem


def test_receptive_fields_max_over_paths(branchy):
  result, _ = branchy
  assert {r.path: r.rf[0] for r in result.rows} == EXPECTED_RF
  assert all(r.rf[0] == r.rf[1] for r in result.rows)
  jumps = {r.path: r.jump for r in result.rows}
  assert jumps['stem'] == (1, 1) and jumps['pool'] == (2, 2) and jumps['c5'] == (4, 4)
  assert jumps['gap'] is None and jumps['head'] is None  # the spatial layout is gone


def test_receptive_fields_equal_the_gradient_support():
  """The input pixels a central output pixel depends on span exactly the receptive field."""
  model = Branchy(features_only=True)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 64, 64, 3)), jnp.float32)
  # Positive weights (and variances): no two paths can cancel, so the support is exact.
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32),
                           jax.eval_shape(model.init, jax.random.key(0), x))
  rows = summary(model, x.shape, print_fn=None).rows
  spatial = [r for r in rows if r.jump is not None]

  @jax.jit
  def centre_pixels(x):
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
    outs = [state['intermediates'][r.path]['__call__'][0] for r in spatial]
    return jnp.stack([o[0, o.shape[1] // 2, o.shape[2] // 2].sum() for o in outs])

  grads = np.abs(np.asarray(jax.jacrev(centre_pixels)(x))).sum(axis=(1, 4))  # (rows, H, W)
  for row, grad in zip(spatial, grads):
    hs, ws = np.nonzero(grad)
    assert 0 < hs.min() and hs.max() < 63 and 0 < ws.min() and ws.max() < 63  # not clipped
    assert (hs.max() - hs.min() + 1, ws.max() - ws.min() + 1) == row.rf, row.path


def test_training_mode_and_given_variables_agree():
  """Batch statistics are constants for the receptive field; real variables give the same."""
  eval_rows = summary(Branchy(), (16, 16, 3), print_fn=None).rows
  train = summary(Branchy(), (2, 16, 16, 3), print_fn=None, train=True)
  assert [r.rf for r in train.rows] == [r.rf for r in eval_rows]
  assert [r.macs for r in train.rows] == [2 * r.macs for r in eval_rows]  # batch of two
  variables = {'params': jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      Branchy().init, jax.random.key(1), jnp.zeros((1, 16, 16, 3)))['params'])}
  variables['batch_stats'] = {'bn': {'mean': np.zeros(4, np.float32),
                                         'var': np.ones(4, np.float32)}}
  given = summary(Branchy(), (16, 16, 3), variables=variables, print_fn=None)
  assert [(r.path, r.params, r.macs, r.rf) for r in given.rows] == [
      (r.path, r.params, r.macs, r.rf) for r in eval_rows]


class WithRawDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = L.Conv2d(2, 3, name='conv')(x).reshape(x.shape[0], -1)
    return nn.Dense(3, name='raw')(x)


def test_params_outside_cnnjax_layers_are_reported():
  result = summary(WithRawDense(), (5, 5, 1), print_fn=None)
  assert result.total_params == 20 + (3 * 3 * 2 + 1) * 3
  assert result.other_params == (3 * 3 * 2 + 1) * 3
  assert 'outside cnnjax.layers: 57' in str(result)


@pytest.mark.parametrize('shape', [(16, 16), (1, 1, 16, 16, 3)])
def test_bad_input_shape(shape):
  with pytest.raises(ValueError, match='input_shape'):
    summary(Branchy(), shape, print_fn=None)


# torchvision's weights metadata (``meta['num_params']``, ``meta['_ops']`` in GMACs at 224x224,
# convolutions and linear layers only), the numbers in its model documentation.
TORCHVISION = [('alexnet', 61_100_840, 0.714), ('vgg16', 138_357_544, 15.47),
               ('resnet18', 11_689_512, 1.814), ('resnet50', 25_557_032, 4.089),
               ('googlenet', 6_624_904, 1.498), ('mobilenet_v2', 3_504_872, 0.301),
               ('efficientnet_b0', 5_288_548, 0.386)]


@pytest.fixture(scope='module')
def zoo():
  models = pytest.importorskip('cnnjax.models')
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = summary(models.get_model(name, num_classes=1000, in_channels=3),
                            (224, 224, 3), print_fn=None)
    return cache[name]
  return get


@pytest.mark.parametrize('name, params, gmacs', TORCHVISION)
def test_zoo_totals_match_torchvision(zoo, name, params, gmacs):
  result = zoo(name)
  assert result.total_params == params
  assert result.other_params == 0  # every parameter sits in a listed layer
  assert round(result.total_macs / 1e9, len(str(gmacs).split('.')[1])) == gmacs


def test_zoo_receptive_fields(zoo):
  # Araujo, Norris & Sim, Distill 2019: AlexNet 195 and VGG-16 212 at the last pool, jump 32.
  for name, last_pool in [('alexnet', 'features_12'), ('vgg16', 'features_30')]:
    row = next(r for r in zoo(name).rows if r.path == last_pool)
    assert (row.rf, row.jump) == (((195, 195) if name == 'alexnet' else (212, 212)), (32, 32))
  # ResNet-18's longest path: stem, pool, then two 3x3 convs per block, strided at each stage.
  chain = [(7, 2), (3, 2)] + [(3, 1)] * 4
  for _ in range(3):
    chain += [(3, 2)] + [(3, 1)] * 3
  resnet = zoo('resnet18')
  assert receptive_field_of(resnet, 'layer4_1/conv2') == shapes.receptive_field(chain) == (435, 32)


def receptive_field_of(result, path):
  row = next(r for r in result.rows if r.path == path)
  return shapes.ReceptiveField(row.rf[0], row.jump[0])


def test_zoo_lists_each_layer(zoo):
  types = [r.type for r in zoo('resnet18').rows]
  assert (types.count('Conv2d'), types.count('BatchNorm'), types.count('Linear')) == (20, 20, 1)
  types = [r.type for r in zoo('vgg16').rows]
  assert (types.count('Conv2d'), types.count('MaxPool2d'), types.count('Linear')) == (13, 5, 3)
