"""Tests for cnnjax.transfer and cnnjax.torchvision_weights without torch: layouts, the NCHW
flatten order, strict reports, head swap, sources (cnnjax checkpoints, safetensors), bad input."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from cnnjax import models, train, transfer
from cnnjax.checkpoint import CheckpointError, Checkpoints
from cnnjax.errors import ConfigError
from cnnjax.torchvision_weights import convert, module_path, nchw_rows_to_nhwc

KW = dict(in_channels=1, widths=(4, 8, 8), hidden=16)


def tcfg(init_from='', exclude=()):
  return ml_collections.ConfigDict(dict(init_from=str(init_from), exclude=tuple(exclude)))


@pytest.fixture(scope='module')
def init_fn():
  """A jitted init for the tiny convnet, one compile per num_classes."""
  cache = {}

  def init(num_classes, seed):
    if num_classes not in cache:
      model = models.get_model('convnet', num_classes=num_classes, **KW)
      cache[num_classes] = jax.jit(lambda key: model.init(key, jnp.zeros((1, 12, 12, 1))))
    return cache[num_classes](jax.random.key(seed))
  return init


def save_checkpoint(directory, variables, step=7):
  tx = optax.sgd(0.1)
  state = train.TrainState(step=jnp.int32(step), params=variables['params'],
                           batch_stats=variables['batch_stats'],
                           opt_state=tx.init(variables['params']), rng=jax.random.key(1),
                           apply_fn=None, tx=tx)
  config = ml_collections.ConfigDict(dict(every_steps=0, keep=2, best_metric=''))
  with Checkpoints(directory / 'checkpoints', config) as ckpts:
    ckpts.save(step, state)


def test_module_paths_follow_the_model_naming_rule():
  assert module_path('layer1.0.downsample.0') == 'layer1_0/downsample_0'
  assert module_path('features.1.0.block.0.0') == 'features_1_0/block_0_0'
  assert module_path('fc') == 'fc'


def test_layouts_of_conv_linear_and_batch_norm():
  rng = np.random.default_rng(0)
  sd = {'conv1.weight': rng.normal(size=(8, 3, 5, 4)).astype(np.float32),
        'conv1.bias': rng.normal(size=8).astype(np.float32),
        'bn1.weight': rng.normal(size=8), 'bn1.bias': rng.normal(size=8),
        'bn1.running_mean': rng.normal(size=8), 'bn1.running_var': rng.uniform(size=8),
        'bn1.num_batches_tracked': np.array(7),
        'layer1.0.fc.weight': rng.normal(size=(10, 6)), 'layer1.0.fc.bias': rng.normal(size=10)}
  out = convert(sd, 'resnet18')
  assert sorted(out) == sorted([
      ('params', 'conv1/kernel'), ('params', 'conv1/bias'), ('params', 'bn1/scale'),
      ('params', 'bn1/bias'), ('batch_stats', 'bn1/mean'), ('batch_stats', 'bn1/var'),
      ('params', 'layer1_0/fc/kernel'), ('params', 'layer1_0/fc/bias')])
  kernel = out[('params', 'conv1/kernel')]
  assert kernel.shape == (5, 4, 3, 8)  # HWIO
  assert kernel[2, 1, 0, 6] == sd['conv1.weight'][6, 0, 2, 1]
  np.testing.assert_array_equal(out[('params', 'layer1_0/fc/kernel')], sd['layer1.0.fc.weight'].T)
  np.testing.assert_array_equal(out[('batch_stats', 'bn1/var')], sd['bn1.running_var'])


@pytest.mark.parametrize('name,layer,hw', [('vgg16_bn', 'classifier_0', (7, 7)),
                                           ('alexnet', 'classifier_1', (6, 6))])
def test_first_linear_gets_the_nchw_flatten_order(name, layer, hw):
  """torch: W @ x.flatten() of a (C, H, W) map; cnnjax: NHWC map flattened @ kernel."""
  rng = np.random.default_rng(1)
  c = 3
  feature_map = rng.normal(size=(c, *hw))
  weight = rng.normal(size=(5, c * hw[0] * hw[1]))
  torch_out = weight @ feature_map.reshape(-1)
  prefix = layer.replace('_', '.')
  kernel = convert({f'{prefix}.weight': weight}, name)[('params', f'{layer}/kernel')]
  np.testing.assert_allclose(feature_map.transpose(1, 2, 0).reshape(-1) @ kernel, torch_out,
                             rtol=1e-12)
  # Any other Linear (and any other model) is a plain transpose.
  np.testing.assert_array_equal(convert({'classifier.3.weight': weight}, name)[
      ('params', 'classifier_3/kernel')], weight.T)
  np.testing.assert_array_equal(convert({f'{prefix}.weight': weight}, 'resnet18')[
      ('params', f'{layer}/kernel')], weight.T)
  with pytest.raises(ValueError, match='cannot follow a flattened'):
    nchw_rows_to_nhwc(np.zeros((50, 2)), hw)


def test_empty_init_from_returns_the_variables_unchanged():
  variables = {'params': {'a': jnp.ones(2)}}
  assert transfer.init_from_pretrained(variables, tcfg(), 'convnet') is variables


def test_from_a_cnnjax_workdir_checkpoints_dir_or_step_dir(tmp_path, init_fn):
  pretrained = init_fn(10, seed=1)
  save_checkpoint(tmp_path, pretrained)
  for source in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '7'):
    loaded = transfer.init_from_pretrained(init_fn(10, seed=2), tcfg(source), 'convnet')
    chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(pretrained))


def test_head_swap_is_refused_unless_excluded_then_freshly_initialized(tmp_path, init_fn):
  pretrained = init_fn(10, seed=1)
  save_checkpoint(tmp_path, pretrained)
  fresh = init_fn(3, seed=2)
  with pytest.raises(CheckpointError) as error:
    transfer.init_from_pretrained(fresh, tcfg(tmp_path), 'convnet')
  message = str(error.value)
  assert 'shape mismatch (file vs model) params/fc2/bias (10,) vs (3,), ' \
         'params/fc2/kernel (16, 10) vs (16, 3)' in message
  assert 'transfer.exclude' in message and '\n' not in message

  loaded = transfer.init_from_pretrained(fresh, tcfg(tmp_path, exclude=['fc2']), 'convnet')
  chex.assert_trees_all_equal(loaded['params']['fc2'], fresh['params']['fc2'])
  for name in ('conv1', 'bn2', 'fc1'):
    chex.assert_trees_all_equal(loaded['params'][name], pretrained['params'][name])
  chex.assert_trees_all_equal(loaded['batch_stats'], pretrained['batch_stats'])


def test_missing_and_unexpected_are_reported_by_full_path():
  a = jax.ShapeDtypeStruct((2,), jnp.float32)
  target = {('params', 'conv1/kernel'): a, ('batch_stats', 'bn1/mean'): a}
  source = {('params', 'conv1/kernel'): a, ('params', 'conv9/kernel'): a}
  with pytest.raises(CheckpointError, match=r'\(missing batch_stats/bn1/mean; unexpected '
                                            r'params/conv9/kernel\)'):
    transfer.check_fits(target, source)
  assert transfer.check_fits(target, source, exclude=('bn1', 'conv9')) == ['batch_stats/bn1/mean']
  with pytest.raises(ConfigError, match="transfer.exclude pattern 'fc' matches no parameter"):
    transfer.check_fits(target, source, exclude=('fc',))
  with pytest.raises(ConfigError, match='not a valid regular expression'):
    transfer.check_fits(target, source, exclude=('(',))


def test_safetensors_state_dict_without_torch(tmp_path, init_fn):
  """A torchvision-style state_dict of the tiny convnet, written and read with NumPy only."""
  rng = np.random.default_rng(2)
  target = init_fn(10, seed=0)
  sd = {}
  for i, width in enumerate(KW['widths'], start=1):
    cin = 1 if i == 1 else KW['widths'][i - 2]
    sd[f'conv{i}.weight'] = rng.normal(size=(width, cin, 3, 3)).astype(np.float32)
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      sd[f'bn{i}.{leaf}'] = rng.uniform(0.5, 1.5, size=width).astype(np.float32)
    sd[f'bn{i}.num_batches_tracked'] = np.array(3, np.int64)
  sd['fc1.weight'] = rng.normal(size=(16, 8)).astype(np.float32)
  sd['fc1.bias'] = rng.normal(size=16).astype(np.float32)
  sd['fc2.weight'] = rng.normal(size=(10, 16)).astype(np.float32)
  sd['fc2.bias'] = rng.normal(size=10).astype(np.float32)
  path = tmp_path / 'convnet.safetensors'
  save_file(sd, str(path))
  loaded = jax.device_get(transfer.init_from_pretrained(target, tcfg(path), 'convnet'))
  np.testing.assert_array_equal(loaded['params']['conv2']['kernel'],
                                sd['conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded['params']['fc2']['kernel'], sd['fc2.weight'].T)
  np.testing.assert_array_equal(loaded['params']['bn3']['scale'], sd['bn3.weight'])
  np.testing.assert_array_equal(loaded['batch_stats']['bn1']['var'], sd['bn1.running_var'])
  assert loaded['params']['fc1']['kernel'].dtype == np.float32

  del sd['bn3.running_var']
  save_file(sd, str(path))
  with pytest.raises(CheckpointError, match=f'weights file {path} does not fit convnet '
                                            r'\(missing batch_stats/bn3/var\)'):
    transfer.init_from_pretrained(target, tcfg(path), 'convnet')


def test_bad_sources_name_the_file(tmp_path):
  variables = {'params': {'a': jnp.ones(2)}}
  with pytest.raises(CheckpointError, match=f'transfer.init_from {tmp_path / "nope"} does not exist'):
    transfer.init_from_pretrained(variables, tcfg(tmp_path / 'nope'), 'resnet18')
  with pytest.raises(CheckpointError, match=f'{tmp_path} holds no cnnjax checkpoint'):
    transfer.init_from_pretrained(variables, tcfg(tmp_path), 'resnet18')
  garbage = tmp_path / 'w.safetensors'
  garbage.write_bytes(b'not a safetensors file')
  with pytest.raises(CheckpointError, match=f'{garbage} is not a readable safetensors file'):
    transfer.init_from_pretrained(variables, tcfg(garbage), 'resnet18')
  text = tmp_path / 'w.h5'
  text.write_text('x')
  with pytest.raises(CheckpointError, match=f'{text} is not a weights file cnnjax reads'):
    transfer.init_from_pretrained(variables, tcfg(text), 'resnet18')
  odd = tmp_path / 'odd.safetensors'
  save_file({'conv1.weight': np.zeros((2, 3, 4), np.float32)}, str(odd))
  with pytest.raises(CheckpointError, match="tensor 'conv1.weight' of shape \\(2, 3, 4\\) is not"):
    transfer.init_from_pretrained(variables, tcfg(odd), 'resnet18')


def test_a_missing_torchvision_file_says_where_to_get_it(tmp_path):
  path = tmp_path / 'hub' / 'resnet18-f37072fd.pth'
  with pytest.raises(CheckpointError) as error:
    transfer.init_from_pretrained({'params': {}}, tcfg(path), 'resnet18')
  message = str(error.value)
  assert message.startswith(f'transfer.init_from {path} does not exist; download')
  assert 'https://download.pytorch.org/models/resnet18-f37072fd.pth' in message
