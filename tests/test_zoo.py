"""The torchvision zoo beyond the classic nets: one representative of every family against
torchvision with copied weights (eval and train mode, small inputs), and options errors.

Parameter counts of every size and the state_dict name maps are checked in test_models.py and
test_torchvision_parity.py (shapes only, through jax.eval_shape and torch's meta device).
"""
from __future__ import annotations

import re
from functools import partial

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


@pytest.mark.parametrize('name', ['mobilenet_v3_small', 'shufflenet_v2_x0_5', 'mnasnet0_5'])
def test_mobile_nets_match_torchvision(name):
  """The real architectures at 64x64 (dropout off so that train mode compares too). Four images:
  in training the last BatchNorm (2x2 pixels at 64x64) normalizes N x 4 values per channel, and
  with two images float32 rounding alone put one of mnasnet0_5's logits 1.7e-4 from
  torchvision's on an AVX-512 CPU, with XLA's convolutions or oneDNN's."""
  kwargs = {} if name.startswith('shufflenet') else {'dropout': 0.0}
  compare(_torchvision(name, num_classes=10, **kwargs), get_model(name, 10, **kwargs),
          random_input((4, 64, 64, 3)))


def test_squeezenet_matches_torchvision():
  compare(_torchvision('squeezenet1_0', num_classes=10), get_model('squeezenet1_0', 10),
          random_input((2, 64, 64, 3)), train_too=False)   # train mode: dropout differs


def test_small_densenet_matches_torchvision():
  """DenseNet's layout at a small growth rate and depth (every size's shapes are checked in
  test_models.py)."""
  import_torch()
  from torchvision.models.densenet import DenseNet as TorchDenseNet
  from cnnjax.models import DenseNet
  config = dict(growth_rate=8, block_config=(2, 3, 2, 2), num_init_features=16, num_classes=10)
  compare(TorchDenseNet(**config), DenseNet(**config), random_input((2, 64, 64, 3)))


def test_small_efficientnet_v2_matches_torchvision():
  """Fused-MBConv and MBConv stages, V2's 1280-channel head and BN eps 1e-3, scaled down."""
  import_torch()
  import torch
  from torchvision.models.efficientnet import (EfficientNet as TorchEfficientNet,
                                               FusedMBConvConfig, MBConvConfig)
  from cnnjax.models import EfficientNet
  stages = (('fused', 1, 3, 1, 16, 16, 2), ('fused', 4, 3, 2, 16, 24, 1),
            ('mbconv', 4, 3, 2, 24, 32, 2))
  config = {'fused': FusedMBConvConfig, 'mbconv': MBConvConfig}
  torch_net = TorchEfficientNet([config[b](*rest) for b, *rest in stages], dropout=0.0,
                                last_channel=1280, num_classes=10,
                                norm_layer=lambda c: torch.nn.BatchNorm2d(c, eps=1e-3))
  ours = EfficientNet(num_classes=10, stages=stages, last_channel=1280, bn_epsilon=1e-3,
                      dropout=0.0, stochastic_depth_prob=0.0)
  torch_net.eval()  # stochastic depth: torch's is on in train mode; compare eval only
  compare(torch_net, ours, random_input((2, 32, 32, 3)), train_too=False)


def test_densenet_files_with_torchvisions_old_key_names_map_strictly():
  """torchvision's pretrained DenseNet files spell 'denselayer1.norm.1'; they map like new ones."""
  import_torch()
  import jax
  import jax.numpy as jnp
  import torch
  import torchvision.models as tvm
  from cnnjax import torchvision_weights, transfer
  with torch.device('meta'):
    state = tvm.densenet121(num_classes=10).state_dict()
  old = {re.sub(r'(denselayer\d+\.(?:norm|relu|conv))([12])\.', r'\1.\2.', k):
         jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32) for k, v in state.items()}
  assert 'features.denseblock1.denselayer1.norm.1.weight' in old
  source = jax.eval_shape(lambda sd: torchvision_weights.convert(sd, 'densenet121'), old)
  model = get_model('densenet121', 10)
  target = transfer.flatten_variables(
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert transfer.check_fits(target, source) == []


def test_regnet_y_matches_torchvision():
  """RegNetY-400MF (grouped convs, SE, projections) at 64x64, eval and train."""
  compare(_torchvision('regnet_y_400mf', num_classes=10), get_model('regnet_y_400mf', 10),
          random_input((2, 64, 64, 3)))


def _imported(torch_module, name):
  """cnnjax variables from ``torch_module``'s state_dict through cnnjax.torchvision_weights."""
  import flax
  from cnnjax import torchvision_weights
  state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
  flat = torchvision_weights.convert(state, name)
  out = {}
  for collection in {c for c, _ in flat}:
    out[collection] = flax.traverse_util.unflatten_dict(
        {path: v for (c, path), v in flat.items() if c == collection}, sep='/')
  return out


def test_small_convnext_matches_torchvision_through_the_weight_import():
  """LayerNorm, layer scale and the downsampling layers, imported by torchvision_weights
  (ConvNeXt has no BatchNorm; every size's shapes are checked in test_models.py)."""
  import_torch()
  import jax
  import chex
  import torch
  from torchvision.models.convnext import CNBlockConfig, ConvNeXt as TorchConvNeXt
  from cnnjax.models import ConvNeXt
  torch.manual_seed(0)
  torch_net = TorchConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)],
                            num_classes=10).eval()
  with torch.no_grad():  # non-trivial LayerNorm affines and layer scales
    for key, value in torch_net.state_dict().items():
      if value.ndim != 2 and value.ndim != 4:
        value.copy_(torch.rand_like(value) + 0.5)
  ours = ConvNeXt(num_classes=10, stages=((16, 2), (32, 2)))
  x = random_input((2, 32, 32, 3))
  variables = _imported(torch_net, 'convnext_tiny')
  chex.assert_trees_all_equal_shapes(jax.eval_shape(ours.init, jax.random.key(0), x), variables)
  with torch.no_grad():
    expected = torch_net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got = jax.jit(lambda v, x: ours.apply(v, x))(variables, x)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_inception_v3_matches_torchvision():
  """At 80x80 (it needs 75x75); eval mode: at this size the last map is 1x1, too few values
  for batch statistics to compare well."""
  compare(_torchvision('inception_v3', num_classes=10, aux_logits=False, init_weights=False),
          get_model('inception_v3', 10, aux_logits=False), random_input((2, 80, 80, 3)),
          train_too=False)


def test_inception_v3_aux_logits_match_torchvision():
  """The AuxLogits head alone on 17x17x768 maps (what Mixed_6e gives it at 299x299) equals
  torchvision's InceptionAux with the same weights, in eval and train mode; in the whole model
  (shapes only) it is sown in training, absent in evaluation, and too small maps are refused."""
  import_torch()
  import jax
  import jax.numpy as jnp
  import torch
  from torchvision.models.inception import InceptionAux as TorchAux
  from cnnjax.errors import ShapeError
  from cnnjax.layers import BatchNorm, Conv2d
  from cnnjax.models.inception import InceptionAux
  torch.manual_seed(0)
  ours = InceptionAux(10, partial(Conv2d, use_bias=False), partial(BatchNorm, epsilon=1e-3))
  compare(TorchAux(768, 10), ours, random_input((4, 17, 17, 768)))

  model = get_model('inception_v3', 10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  assert 'AuxLogits' in variables['params'] and 'AuxLogits' in variables['batch_stats']

  def run(size, train):
    return jax.eval_shape(partial(model.apply, train=train, rngs={'dropout': jax.random.key(0)},
                                  mutable=['batch_stats', 'aux_logits']),
                          variables, jnp.zeros((2, size, size, 3)))
  logits, updates = run(299, True)
  assert jax.tree.map(lambda a: a.shape, updates['aux_logits']) == {'AuxLogits': {'logits': ((2, 10),)}}
  assert logits.shape == (2, 10) and 'aux_logits' not in run(299, False)[1]
  with pytest.raises(ShapeError, match='needs Mixed_6e maps of at least 17x17 .* aux_logits=False'):
    run(280, True)


def test_pretrained_loads_torchvision_weights_and_replaces_a_mismatched_head(tmp_path, capsys):
  """cnnjax.pretrained on a torchvision file: the same logits; with another class count a fresh
  head (SqueezeNet's is a conv), said so, everything else loaded; a missing file names the URL."""
  import_torch()
  import jax
  import torch
  from cnnjax.errors import CheckpointError
  from cnnjax.zoo import pretrained
  net = _torchvision('squeezenet1_1').eval()
  path = tmp_path / 'squeezenet1_1.pth'
  torch.save(net.state_dict(), path)
  x = random_input((2, 64, 64, 3))
  with torch.no_grad():
    expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  model, variables = pretrained('squeezenet1_1', weights=path)
  apply = jax.jit(lambda v, x: model.apply(v, x))
  np.testing.assert_allclose(apply(variables, x), expected, atol=1e-4, rtol=1e-4)
  assert 'pretrained:' not in capsys.readouterr().out

  model10, variables10 = pretrained('squeezenet1_1', weights=path, num_classes=10, image_size=64)
  said = capsys.readouterr().out
  assert said == (f'pretrained: squeezenet1_1 loaded from weights file {path}; the classifier '
                  f'classifier_1 is freshly initialized for 10 classes.\n')
  params, params10 = variables['params'], variables10['params']
  assert params10['classifier_1']['kernel'].shape == (1, 1, 512, 10)
  np.testing.assert_array_equal(params10['features_3']['squeeze']['kernel'],
                                params['features_3']['squeeze']['kernel'])
  assert model10.num_classes == 10

  missing = tmp_path / 'hub' / 'resnet18-f37072fd.pth'
  with pytest.raises(CheckpointError, match='https://download.pytorch.org/models/resnet18-'):
    pretrained('resnet18', weights=missing)
  with pytest.raises(ConfigError, match='has no official torchvision weights'):
    pretrained('small_resnet')
