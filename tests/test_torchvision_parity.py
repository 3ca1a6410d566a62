"""cnnjax vs the real torchvision: same weights (random, BN running stats randomized too), eval
mode, 224x224, logits equal to <= 1e-4 relative error; every supported architecture's state_dict
maps strictly onto the cnnjax model; .pth files are read only with weights_only=True.

Everything torch runs in one subprocess that imports torchvision first (torchvision imported
after TensorFlow crashes the interpreter, and other tests may have imported TensorFlow).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip('torchvision')  # skipped cleanly without the `torch` extra

from cnnjax import torchvision_weights  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
# googlenet: torchvision's file carries the auxiliary classifiers aux1/aux2 (ignored, said so).
PARITY_MODELS = {'resnet18': ('pth', 2), 'resnet50': ('safetensors', 1),
                 'vgg16_bn': ('pth', 1), 'alexnet': ('safetensors', 2), 'googlenet': ('pth', 1),
                 'mobilenet_v3_small': ('safetensors', 2), 'squeezenet1_1': ('pth', 2)}
ALL_MODELS = tuple(torchvision_weights.IMAGENET_FILES)  # every model with official weights

_SCRIPT = r'''
import contextlib, io, json, pickle, sys, time, pathlib
import torch, torchvision  # first: before anything can import TensorFlow
import safetensors.torch
import numpy as np
import jax, jax.numpy as jnp, ml_collections
from cnnjax import models, torchvision_weights, transfer
from cnnjax.checkpoint import CheckpointError
sys.path.insert(0, 'tests')
from torch_compare import torchvision_on_meta

out_dir = pathlib.Path(sys.argv[1])
parity, fits, errors, printed = {}, {}, {}, {}
torch.manual_seed(0)
for name, (kind, batch) in json.loads(sys.argv[2]).items():
  t0 = time.time()
  net = getattr(torchvision.models, name)()
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.5, 0.5)
  net.eval()
  x = torch.randn(batch, 3, 224, 224)
  with torch.no_grad():
    expected = net(x).numpy()
  path = out_dir / f'{name}.{kind}'
  if kind == 'pth':
    torch.save(net.state_dict(), path)
  else:
    safetensors.torch.save_file(net.state_dict(), str(path))
  del net
  model = models.get_model(name, num_classes=1000)
  target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  with contextlib.redirect_stdout(io.StringIO()) as said:
    variables = transfer.init_from_pretrained(
        target, ml_collections.ConfigDict(dict(init_from=str(path), exclude=())), name)
  printed[name] = said.getvalue()
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))
  parity[name] = {'max_abs_rel': float(np.max(np.abs(logits - expected)) / np.max(np.abs(expected))),
                  'l2_rel': float(np.linalg.norm(logits - expected) / np.linalg.norm(expected)),
                  'top1_equal': bool((logits.argmax(-1) == expected.argmax(-1)).all()),
                  'seconds': time.time() - t0}
  path.unlink()

for name in json.loads(sys.argv[3]):  # shapes only: meta tensors, jax.eval_shape
  net = torchvision_on_meta(name, num_classes=10)  # googlenet: with aux1/aux2
  shapes = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32) for k, v in net.state_dict().items()}
  source = jax.eval_shape(lambda sd: torchvision_weights.convert(sd, name), shapes)
  model = models.get_model(name, num_classes=10)
  target = transfer.flatten_variables(jax.eval_shape(  # 96x96: inception_v3 needs 75x75
      model.init, jax.random.key(0), jnp.zeros((1, 96, 96, 3))))
  try:
    fresh = transfer.check_fits(target, source, (), name, name)
    fits[name] = 'ok' if not fresh else f'fresh {fresh}'
  except CheckpointError as e:
    fits[name] = str(e)

class NotATensor:  # a pickle torch.load(weights_only=True) must refuse
  pass
bad = out_dir / 'evil.pth'
with open(bad, 'wb') as f:
  pickle.dump({'conv1.weight': NotATensor()}, f)
for label, path in (('pickle', bad), ('suffix', out_dir / 'weights.npz')):
  path.touch()
  try:
    transfer.load_source(path, 'resnet18')
    errors[label] = 'no error'
  except CheckpointError as e:
    errors[label] = str(e)
print('RESULT' + json.dumps({'parity': parity, 'fits': fits, 'errors': errors,
                            'printed': printed}))
'''


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-c', _SCRIPT, str(tmp_path_factory.mktemp('tv')),
       json.dumps(PARITY_MODELS), json.dumps(ALL_MODELS)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
  data = json.loads(lines[-1][len('RESULT'):])
  print(json.dumps(data['parity'], indent=1))
  return data


@pytest.mark.slow
@pytest.mark.parametrize('name', PARITY_MODELS)
def test_logits_match_torchvision(results, name):
  err = results['parity'][name]
  assert err['max_abs_rel'] <= 1e-4, err
  assert err['top1_equal'], err


@pytest.mark.parametrize('name', ALL_MODELS)
def test_state_dict_maps_strictly(results, name):
  assert results['fits'][name] == 'ok'


def test_googlenet_aux_heads_are_ignored_and_said_so(results):
  assert 'ignoring the auxiliary classifiers aux1, aux2 in ' in results['printed']['googlenet']
  assert results['printed']['googlenet'].count('\n') == 2  # that line, then 'initialized from'
  assert results['printed']['resnet18'].count('\n') == 1


def test_pth_is_never_unpickled_and_unknown_files_are_refused(results):
  assert 'evil.pth is not a PyTorch weights file that loads with weights_only=True' in \
      results['errors']['pickle']
  assert 'weights.npz is not a weights file cnnjax reads' in results['errors']['suffix']
