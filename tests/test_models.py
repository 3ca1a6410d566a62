"""The model zoo: parameter counts, output shapes, names vs torchvision, forward passes, errors.

Parameter counts and shapes come from one ``jax.eval_shape`` per model (nothing is allocated
for VGG's 138M parameters). Expected counts are published numbers (torchvision's documented
``num_params``, the PyTorch tutorial, LeNet-5) or are derived from the architecture's spec
below; when torchvision is importable its own models are counted too.
"""
from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.models import (MODELS, ResNet, _model_class, activations, get_model, layer_names,
                           model_names)
from torch_compare import compare, import_torch, init_key, torch_to_flax, torchvision_on_meta


def _conv(cin, cout, k, bias=False):
  return cin * cout * k * k + (cout if bias else 0)


def _bn(c):
  return 2 * c


def _fc(cin, cout):
  return cin * cout + cout


def _basic_block(cin, cout):
  shortcut = _conv(cin, cout, 1) + _bn(cout) if cin != cout else 0
  return _conv(cin, cout, 3) + _bn(cout) + _conv(cout, cout, 3) + _bn(cout) + shortcut


def _cifar_resnet(widths, num_classes=10):
  total, cin = _conv(3, 64, 3) + _bn(64), 64
  for width in widths:
    total += _basic_block(cin, width) + _basic_block(width, width)
    cin = width
  return total + _fc(cin, num_classes)


# torchvision's documented num_params, and the numbers for the small nets.
PUBLISHED = {
    'tutorial_net': 62_006,
    'lenet5': 61_706,
    'alexnet': 61_100_840,
    'vgg11': 132_863_336,
    'vgg13': 133_047_848,
    'vgg16': 138_357_544,
    'vgg19': 143_667_240,
    'vgg11_bn': 132_868_840,
    'vgg13_bn': 133_053_736,
    'vgg16_bn': 138_365_992,
    'vgg19_bn': 143_678_248,
    'googlenet': 6_624_904,
    'inception_v3': 27_161_264,   # with AuxLogits; 23,834,568 with aux_logits=False
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
    'resnext50_32x4d': 25_028_904,
    'resnext101_32x8d': 88_791_336,
    'resnext101_64x4d': 83_455_272,
    'wide_resnet50_2': 68_883_240,
    'wide_resnet101_2': 126_886_696,
    'cifar_resnet18': 11_173_962,   # the ResNet-18 of kuangliu/pytorch-cifar
    'efficientnet_b0': 5_288_548,
    'mobilenet_v2': 3_504_872,
    'efficientnet_b1': 7_794_184,
    'efficientnet_b2': 9_109_994,
    'efficientnet_b3': 12_233_232,
    'efficientnet_b4': 19_341_616,
    'efficientnet_b5': 30_389_784,
    'efficientnet_b6': 43_040_704,
    'efficientnet_b7': 66_347_960,
    'efficientnet_v2_s': 21_458_488,
    'efficientnet_v2_m': 54_139_356,
    'efficientnet_v2_l': 118_515_272,
    'mobilenet_v3_large': 5_483_032,
    'mobilenet_v3_small': 2_542_856,
    'squeezenet1_0': 1_248_424,
    'squeezenet1_1': 1_235_496,
    'shufflenet_v2_x0_5': 1_366_792,
    'shufflenet_v2_x1_0': 2_278_604,
    'shufflenet_v2_x1_5': 3_503_624,
    'shufflenet_v2_x2_0': 7_393_996,
    'mnasnet0_5': 2_218_512,
    'mnasnet0_75': 3_170_208,
    'mnasnet1_0': 4_383_312,
    'mnasnet1_3': 6_282_256,
    'densenet121': 7_978_856,
    'densenet161': 28_681_000,
    'densenet169': 14_149_480,
    'densenet201': 20_013_928,
    'regnet_y_400mf': 4_344_144,
    'regnet_y_800mf': 6_432_512,
    'regnet_y_1_6gf': 11_202_430,
    'regnet_y_3_2gf': 19_436_338,
    'regnet_y_8gf': 39_381_472,
    'regnet_y_16gf': 83_590_140,
    'regnet_y_32gf': 145_046_770,
    'regnet_y_128gf': 644_812_894,
    'regnet_x_400mf': 5_495_976,
    'regnet_x_800mf': 7_259_656,
    'regnet_x_1_6gf': 9_190_136,
    'regnet_x_3_2gf': 15_296_552,
    'regnet_x_8gf': 39_572_648,
    'regnet_x_16gf': 54_278_536,
    'regnet_x_32gf': 107_811_560,
    'convnext_tiny': 28_589_128,
    'convnext_small': 50_223_688,
    'convnext_base': 88_591_464,
    'convnext_large': 197_767_336,
    # Derived from the spec: conv(no bias)+BN stages 32, 64, 128; fc 256; fc 10.
    'convnet': (_conv(3, 32, 3) + _bn(32) + _conv(32, 64, 3) + _bn(64) + _conv(64, 128, 3)
                + _bn(128) + _fc(128, 256) + _fc(256, 10)),
    'small_resnet': _cifar_resnet((64, 128, 256)),
    # The quickstart net: 5x5 conv(no bias)+BN stages 16, 32 at 28x28 -> 7x7x32; fc 128; fc 10.
    'mnist_cnn': (_conv(1, 16, 5) + _bn(16) + _conv(16, 32, 5) + _bn(32) + _fc(7 * 7 * 32, 128)
                  + _fc(128, 10)),
    # airbench94.py: 2x2 whitening conv 3->24 (bias), groups of two 3x3 convs 64/256/256 with
    # BN bias only (scale frozen at 1, not a parameter), linear 256->10 without bias.
    'airbench94': (_conv(3, 24, 2, bias=True) + _conv(24, 64, 3) + _conv(64, 64, 3)
                   + _conv(64, 256, 3) + 3 * _conv(256, 256, 3) + (2 * 64 + 4 * 256) + 256 * 10),
}
NATIVE_SIZE = {'lenet5': 28, 'mnist_cnn': 28, 'tutorial_net': 32, 'convnet': 32,
               'cifar_resnet18': 32, 'small_resnet': 32, 'airbench94': 32}
TORCHVISION = [n for n in MODELS if n in PUBLISHED and n not in NATIVE_SIZE]


def test_every_model_has_a_published_count_and_cifar_formula_agrees():
  assert set(PUBLISHED) == set(MODELS) == set(model_names())
  assert _cifar_resnet((64, 128, 256, 512)) == PUBLISHED['cifar_resnet18']


_ABSTRACT = {}


def abstract(name):
  """(logits, variables incl. intermediates) of model ``name`` at its native input, shapes only."""
  if name not in _ABSTRACT:
    model = get_model(name)
    size = 299 if name == 'inception_v3' else NATIVE_SIZE.get(name, 224)  # AuxLogits trains at 299
    x = jnp.zeros((1, size, size, model.in_channels))
    init = partial(model.init_with_output, capture_intermediates=True)
    _ABSTRACT[name] = (model, x) + jax.eval_shape(init, jax.random.key(0), x)
  return _ABSTRACT[name]


def count(tree) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', list(MODELS))
def test_parameter_count_and_output_shape(name):
  model, _, logits, variables = abstract(name)
  assert count(variables['params']) == PUBLISHED[name]
  assert logits.shape == (1, model.num_classes) and logits.dtype == jnp.float32
  # Every model runs with capture_intermediates (feature-map visualization relies on it).
  assert len(variables['intermediates']) > 3


def _first_of_each_class(names):
  seen, out = set(), []
  for name in names:
    cls = _model_class(MODELS[name])
    if cls not in seen:
      seen.add(cls)
      out.append(name)
  return out


# The classic nets all, and one size of each zoo family added since (its other sizes differ
# only in widths and depths; their shapes are traced by the count test above).
CLASSIC = ['tutorial_net', 'lenet5', 'convnet', 'mnist_cnn', 'alexnet', 'vgg11', 'vgg13', 'vgg16',
           'vgg19', 'vgg11_bn', 'vgg13_bn', 'vgg16_bn', 'vgg19_bn', 'googlenet', 'resnet18',
           'resnet34', 'resnet50', 'resnet101', 'resnet152', 'cifar_resnet18', 'small_resnet',
           'efficientnet_b0', 'mobilenet_v2', 'airbench94']
TRAIN_TRACED = CLASSIC + [n for n in _first_of_each_class(MODELS) if n not in CLASSIC] + [
    'resnext50_32x4d', 'efficientnet_v2_s']  # grouped bottlenecks; Fused-MBConv


@pytest.mark.parametrize('name', TRAIN_TRACED)
def test_train_mode_traces_with_dropout_rng(name):
  model, x, _, variables = abstract(name)
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  apply = partial(model.apply, train=True, mutable=['batch_stats'])
  logits, updates = jax.eval_shape(apply, variables, x, rngs={'dropout': jax.random.key(0)})
  assert logits.shape == (1, model.num_classes)
  chex.assert_trees_all_equal_shapes(updates.get('batch_stats', {}),
                                     variables.get('batch_stats', {}))


def test_inception_v3_without_aux_logits_counts_torchvision_s():
  import_torch()
  tv_model = torchvision_on_meta('inception_v3', aux_logits=False, init_weights=False)
  variables = jax.eval_shape(get_model('inception_v3', aux_logits=False).init,
                             jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  assert count(variables['params']) == sum(p.numel() for p in tv_model.parameters()) == 23_834_568
  assert 'AuxLogits' not in variables['params']


def test_torchvision_counts_and_names_match():
  """torchvision's own models: same count, and its state_dict maps onto our variables by the
  naming rule of cnnjax/models/common.py with every name and shape matching."""
  import_torch()
  for name in TORCHVISION:
    kwargs = {'googlenet': {'aux_logits': False, 'init_weights': False},  # as its weights
              'inception_v3': {'init_weights': False}}.get(name, {})
    tv_model = torchvision_on_meta(name, **kwargs)
    assert sum(p.numel() for p in tv_model.parameters()) == PUBLISHED[name], name
    _, _, _, variables = abstract(name)
    ours = {k: v for k, v in variables.items() if k != 'intermediates'}
    expected = torch_to_flax(tv_model, as_shapes=True)
    assert jax.tree.structure(ours) == jax.tree.structure(expected), name
    chex.assert_trees_all_equal_shapes(ours, expected)


def test_resnet18_matches_torchvision_numerically_and_activations_match_hooks():
  """The one real forward of an ImageNet model: torchvision's resnet18 weights, copied by name,
  give the same logits (eval and train), the same running statistics, and the same layer1.0
  feature map as a torch forward hook."""
  torch = import_torch()
  import torchvision.models as tvm
  torch.manual_seed(0)
  tv_model = tvm.resnet18(num_classes=10)
  model = get_model('resnet18', num_classes=10)
  x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  compare(tv_model, model, x)

  tv_model.eval()
  variables = torch_to_flax(tv_model)
  captured = {}
  tv_model.layer1[0].register_forward_hook(lambda m, i, o: captured.update(out=o))
  with torch.no_grad():
    tv_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  feature_map = jax.jit(lambda v, x: activations(model, v, x, 'layer1.0'))(variables, x)
  np.testing.assert_allclose(feature_map, captured['out'].numpy().transpose(0, 2, 3, 1),
                             atol=1e-4, rtol=1e-4)


def random_variables(model, x):
  """Variables with the model's shapes filled by NumPy: skips compiling ``init`` (seconds per
  model here); kernels get a 1/sqrt(fan_in) scale so activations stay O(1)."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * std)
    if name in ('scale', 'var'):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * 0.1)
  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.key(0), x))


SMALL = [('tutorial_net', (2, 32, 32, 3)), ('lenet5', (2, 28, 28, 1)), ('mnist_cnn', (2, 28, 28, 1)),
         ('convnet', (2, 32, 32, 3)), ('small_resnet', (2, 32, 32, 3)),
         ('cifar_resnet18', (2, 32, 32, 3))]


@pytest.mark.parametrize('name,shape', SMALL)
def test_small_models_jit_forward_in_train_and_eval(name, shape):
  model = get_model(name)
  x = jax.random.normal(jax.random.key(1), shape)
  variables = random_variables(model, x)
  eval_fn = jax.jit(partial(model.apply, train=False))
  train_fn = jax.jit(partial(model.apply, train=True, mutable=['batch_stats']))
  logits = eval_fn(variables, x)
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  chex.assert_trees_all_equal(logits, eval_fn(variables, x))   # eval is deterministic
  train_logits, updates = train_fn(variables, x, rngs={'dropout': jax.random.key(2)})
  chex.assert_tree_all_finite(train_logits)
  if 'batch_stats' in variables:
    # Train mode normalizes with batch statistics and moves the running ones.
    assert not np.allclose(train_logits, logits)
    old, new = variables['batch_stats'], updates['batch_stats']
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
  else:
    assert updates == {}
    np.testing.assert_allclose(train_logits, logits, rtol=1e-6)  # no BN, no dropout
  if name == 'convnet':   # dropout draws from the 'dropout' rng
    other, _ = train_fn(variables, x, rngs={'dropout': jax.random.key(3)})
    assert not np.allclose(other, train_logits)


def test_resnet_init_is_torchvisions_and_zero_init_residual():
  model = ResNet(stage_sizes=(1, 1), stem='cifar', zero_init_residual=True)
  params = jax.jit(model.init)(init_key(), jnp.zeros((1, 8, 8, 3)))['params']
  kernel = params['layer2_0']['conv2']['kernel']          # 3x3, 128 -> 128
  # Kaiming normal, fan_out mode: std sqrt(2 / (9 * 128)).
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (9 * 128)), rtol=0.02)
  chex.assert_trees_all_equal(params['layer1_0']['bn2']['scale'], jnp.zeros(64))
  chex.assert_trees_all_equal(params['layer1_0']['bn1']['scale'], jnp.ones(64))


def test_compute_dtype_bfloat16_keeps_float32_params_and_logits():
  model = get_model('tutorial_net', dtype=jnp.bfloat16)
  init = partial(model.init_with_output, capture_intermediates=True)
  logits, variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
  assert logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(variables['params'])} == {jnp.dtype('float32')}
  assert variables['intermediates']['conv1']['__call__'][0].dtype == jnp.bfloat16


def test_activations_of_named_layers_and_unknown_layer_lists_names():
  model = get_model('convnet')
  x = jnp.ones((2, 32, 32, 3))
  variables = random_variables(model, x)
  conv2 = jax.jit(lambda v: activations(model, v, x, 'conv2'))(variables)
  assert conv2.shape == (2, 16, 16, 64) and float(jnp.abs(conv2).max()) > 0
  assert jax.eval_shape(lambda v: activations(model, v, x, 'fc1'), variables).shape == (2, 256)
  assert layer_names(model, variables, x) == [  # layers only: they hold their own parameters
      'Dropout_0', 'GlobalAvgPool_0', 'MaxPool2d_0', 'MaxPool2d_1', 'bn1', 'bn2', 'bn3',
      'conv1', 'conv2', 'conv3', 'fc1', 'fc2']
  with pytest.raises(ValueError, match=r"no layer 'conv9'.*bn1, bn2, bn3, conv1"):
    activations(model, variables, x, 'conv9')
  # Torchvision-style Sequential indices name VGG's layers; unknown nested paths list siblings.
  _, _, _, vgg = abstract('vgg16')
  names = layer_names(get_model('vgg16'), {'params': vgg['params']}, jnp.zeros((1, 32, 32, 3)))
  assert {'features_0', 'features_4', 'features_28', 'classifier_6'} <= set(names)
  resnet, _, _, resnet_vars = abstract('resnet18')
  resnet_vars = {k: v for k, v in resnet_vars.items() if k != 'intermediates'}
  with pytest.raises(ValueError, match=r"under 'layer1_0': layer1_0/bn1, layer1_0/bn2"):
    jax.eval_shape(lambda v: activations(resnet, v, jnp.zeros((1, 64, 64, 3)), 'layer1_0/x'),
                   resnet_vars)


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet19'; valid names: tutorial_net, "
                                       r"lenet5, .*resnet18.*efficientnet_b0"):
    get_model('resnet19')


def test_unknown_option_is_named():
  with pytest.raises(ValueError, match=r"'resnet18' has no option 'widht'; valid options: "):
    get_model('resnet18', widht=2)
  model = get_model('lenet5', 7)
  assert (model.num_classes, model.in_channels) == (7, 1)
  assert get_model('resnet50', in_channels=1).in_channels == 1


@pytest.mark.parametrize('name', list(MODELS))
def test_wrong_rank_or_channel_count_is_a_clear_value_error(name):
  model = get_model(name)
  c = model.in_channels
  for bad in ((32, 32, c), (2, 32, 32, c + 1)):   # no batch axis; wrong channel count
    with pytest.raises(ValueError, match=rf'expects input of shape \(N, H, W, {c}\), got '):
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(bad))


def test_input_error_message_is_one_sentence():
  with pytest.raises(ValueError) as error:
    get_model('resnet18').init(jax.random.key(0), jnp.zeros((2, 32, 32, 1)))
  assert str(error.value) == 'ResNet expects input of shape (N, H, W, 3), got (2, 32, 32, 1).'


def test_input_too_small_for_alexnet_names_the_problem():
  model = get_model('alexnet')
  with pytest.raises(ValueError, match='output would be empty'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
