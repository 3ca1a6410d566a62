"""cnnjax.export and `run.py --export`: a short quickstart run exported to every format, each
reloaded in its own runtime and compared with the JAX model; a streamed run (a folder of JPEGs
cropped to 16 px) exported and checked batch by batch; one model of every zoo family through
StableHLO and ONNX at a small input; the check that refuses a wrong export; bad input."""
import json
import os
import pathlib
import sys

import numpy as np
import pytest

try:  # torchvision imported after TensorFlow (the TFLite route) crashes the interpreter
  import torchvision  # noqa: F401
except ImportError:
  pass

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import run as run_cli  # noqa: E402
from cnnjax import config as config_lib
from cnnjax import data, export, models, runner
from cnnjax.errors import ExportError  # noqa: E402
from tests.test_streaming import write_tree  # noqa: E402

onnxruntime = pytest.importorskip('onnxruntime', reason='ONNX export needs onnxruntime')
pytest.importorskip('jax2onnx', reason='ONNX export needs jax2onnx')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """quickstart cut to 40 steps, evaluated at the end: a workdir with checkpoints."""
  workdir = tmp_path_factory.mktemp('quickstart')
  config = config_lib.load_experiment('quickstart', [
      'train.num_steps=40', 'train.progress_bar=false', 'train.eval_every_steps=20'])
  runner.run(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def test_split():
  ds = data.load_dataset('mnist5k')
  images = ((ds.x_test.astype(np.float32) - np.float32(ds.mean[0])) / np.float32(ds.std[0]))
  return images.astype(np.float32), ds.y_test


def cli_export(workdir, fmt, *extra):
  return run_cli.main(['--experiment', 'quickstart', '--workdir', str(workdir),
                       '--export', fmt, *extra])


def jax_model_of(workdir, suffix='.onnx'):
  """(model, variables) of the checkpoint the export's metadata names."""
  from cnnjax import checkpoint
  model = models.get_model('mnist_cnn', num_classes=10, in_channels=1)
  meta = json.loads((workdir / 'export' / f'mnist_cnn{suffix}.json').read_text())
  variables, _ = checkpoint.load_variables(meta['source_checkpoint']['directory'])
  return model, variables


def test_cli_exports_every_format_checked_and_described(trained, test_split, capsys):
  images, labels = test_split
  for fmt in ('stablehlo', 'onnx', 'onnx-int8'):
    assert cli_export(trained, fmt) == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  assert out.count('top-1 identical') == 2 and 'int8' in out
  export_dir = trained / 'export'
  meta = json.loads((export_dir / 'mnist_cnn.onnx.json').read_text())
  assert meta['input'] == {'name': 'image', 'shape': [None, 28, 28, 1], 'dtype': 'float32',
                           'layout': 'NHWC'}
  assert meta['output']['shape'] == [None, 10]
  accuracy = {int(p.name): json.loads((p / 'metrics' / 'metrics').read_text())['test_accuracy']
              for p in (trained / 'checkpoints').glob('[0-9]*')}
  assert accuracy[meta['source_checkpoint']['step']] == max(accuracy.values())  # the best one
  assert meta['class_names'] == [str(i) for i in range(10)]
  assert meta['normalization']['mean'][0] == pytest.approx(33.4, abs=0.5)
  assert meta['cnnjax_version'] and meta['check']['images'] == 1000
  assert meta['check']['max_relative_error'] <= 1e-5 and meta['check']['top1_mismatches'] == 0

  # Each file reloads in its own runtime and gives the JAX model's logits at another batch size.
  model, variables = jax_model_of(trained)
  x = images[:7]
  want = np.asarray(model.apply(variables, x))
  scale = np.abs(want).max()
  exported = export.stablehlo.load(export_dir / 'mnist_cnn.stablehlo')
  np.testing.assert_allclose(np.asarray(exported.call(x)), want, atol=1e-5 * scale)
  session = onnxruntime.InferenceSession(str(export_dir / 'mnist_cnn.onnx'))
  assert session.get_inputs()[0].shape[0] not in (1, 7)      # a symbolic batch dimension
  np.testing.assert_allclose(session.run(None, {'image': x})[0], want, atol=1e-5 * scale)

  int8 = json.loads((export_dir / 'mnist_cnn.int8.onnx.json').read_text())['int8']
  assert int8['size_ratio'] >= 3.5
  assert int8['float32_accuracy'] - int8['int8_accuracy'] <= 0.015   # 40 steps: ~90% float32
  assert int8['calibration_images'] == 1000
  import onnx
  kinds = {n.op_type for n in onnx.load(str(export_dir / 'mnist_cnn.int8.onnx')).graph.node}
  assert 'QuantizeLinear' in kinds and 'DequantizeLinear' in kinds
  plain = {n.op_type for n in onnx.load(str(export_dir / 'mnist_cnn.onnx')).graph.node}
  assert plain <= {'Transpose', 'Conv', 'Relu', 'MaxPool', 'Reshape', 'Gemm'}  # BN folded


def test_cli_exports_tflite_checked(trained, test_split, capsys):
  tf = pytest.importorskip('tensorflow', reason='TFLite export needs TensorFlow')
  code = cli_export(trained, 'tflite')
  err = capsys.readouterr().err
  if code == 2 and 'does not work with JAX' in err:
    assert err.count('\n') == 1 and export.tflite.route_unavailable(tf.__version__) in err
    pytest.skip(err.strip())
  assert code == 0, err
  meta = json.loads((trained / 'export' / 'mnist_cnn.tflite.json').read_text())
  assert meta['check']['max_relative_error'] <= 1e-5 and meta['check']['top1_mismatches'] == 0
  model, variables = jax_model_of(trained, '.tflite')
  x = test_split[0][:7]
  want = np.asarray(model.apply(variables, x))
  run = export.tflite.runner((trained / 'export' / 'mnist_cnn.tflite').read_bytes())
  np.testing.assert_allclose(run(x), want, atol=1e-5 * np.abs(want).max())


def test_onnx_takes_nchw_on_request(trained, test_split, capsys):
  images, _ = test_split
  assert cli_export(trained, 'onnx', '--export-layout', 'nchw') == 0, capsys.readouterr().err
  meta = json.loads((trained / 'export' / 'mnist_cnn.onnx.json').read_text())
  assert meta['input']['shape'] == [None, 1, 28, 28] and meta['input']['layout'] == 'NCHW'
  model, variables = jax_model_of(trained)
  x = images[:5]
  session = onnxruntime.InferenceSession(str(trained / 'export' / 'mnist_cnn.onnx'))
  got = session.run(None, {'image': np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
  want = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_bad_input_is_one_sentence_and_exit_2(trained, tmp_path, capsys, monkeypatch):
  assert cli_export(tmp_path / 'empty', 'onnx') == 2
  err = capsys.readouterr().err
  assert 'holds no checkpoint to export' in err and 'Traceback' not in err
  assert cli_export(trained, 'coreml') == 2
  assert "unknown export format 'coreml'" in capsys.readouterr().err
  assert cli_export(trained, 'stablehlo', '--export-layout', 'nchw') == 2
  assert 'not offered for stablehlo' in capsys.readouterr().err
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)   # as if it were not installed
  before = (trained / 'export' / 'mnist_cnn.onnx').read_bytes() \
      if (trained / 'export' / 'mnist_cnn.onnx').exists() else None
  assert cli_export(trained, 'onnx') == 2
  err = capsys.readouterr().err
  assert 'needs the Python package jax2onnx' in err and 'pip install' in err
  after = (trained / 'export' / 'mnist_cnn.onnx').read_bytes() \
      if (trained / 'export' / 'mnist_cnn.onnx').exists() else None
  assert before == after


# A run that streams its data: 18 train / 9 test JPEGs of 20-90 px in 3 classes, cropped to 16.
STREAMED = ['model.name=convnet', 'model.kwargs.widths=(4,8,8)', 'model.kwargs.hidden=16',
            'data.image_size=16', 'data.workers=0', 'train.batch_size=6', 'train.num_steps=4',
            'train.eval_batch_size=9', 'train.progress_bar=false']


@pytest.fixture(scope='module')
def streamed(tmp_path_factory):
  """(workdir, overrides) of a 4-step convnet run streamed from a folder of JPEGs."""
  root = tmp_path_factory.mktemp('jpegs')
  write_tree(root)
  overrides = STREAMED + [f'data.name=folder:{root}']
  workdir = root / 'run'
  runner.run(config_lib.load_experiment('quickstart', overrides), workdir)
  return workdir, overrides


def test_a_streamed_run_exports_checked_batch_by_batch(streamed, capsys, monkeypatch):
  workdir, overrides = streamed
  args = ['--experiment', 'quickstart', '--workdir', str(workdir)] + [
      f'--config.{o}' for o in overrides]
  seen = []  # the size of every batch normalized for the check: never the whole split
  normalize = export.check.normalized
  monkeypatch.setattr(export.check, 'normalized',
                      lambda x, *a: seen.append(len(x)) or normalize(x, *a))
  monkeypatch.setattr(export, 'CHECK_BATCH', 4)   # 9 test images: 4 + 4 + 1 (padded)
  for fmt in ('stablehlo', 'onnx'):
    assert run_cli.main(args + ['--export', fmt]) == 0, capsys.readouterr().err
  assert seen == [4, 4, 4] * 2
  out = capsys.readouterr().out
  assert out.count('checked on 9 test images') == 2 and "('N', 16, 16, 3)" in out
  meta = json.loads((workdir / 'export' / 'convnet.onnx.json').read_text())
  assert meta['input']['shape'] == [None, 16, 16, 3]        # the eval crop, not a stored size
  assert meta['preprocessing']['center_crop'] == 16
  assert meta['class_names'] == ['ant', 'bee', 'cow'] and meta['output']['shape'] == [None, 3]
  check = meta['check']
  assert check['images'] == 9 and check['top1_mismatches'] == 0
  assert check['max_relative_error'] <= 1e-5
  step = meta['source_checkpoint']['step']
  scored = json.loads((workdir / 'checkpoints' / str(step) / 'metrics' / 'metrics').read_text())
  assert check['accuracy'] == pytest.approx(scored['test_accuracy'])  # what evaluation counted

  # A deployer's path: one test image through the eval crop, normalized by the metadata.
  config = config_lib.load_experiment('quickstart', overrides)
  from cnnjax.export import run_export
  model, variables, dataset, _ = run_export.load_best(config, workdir)
  image, _ = dataset.test_image(8)
  norm = meta['normalization']
  x = ((image[None].astype(np.float32) - np.float32(norm['mean'])) /
       np.float32(norm['std'])).astype(np.float32)
  want = np.asarray(model.apply(variables, x, train=False))
  session = onnxruntime.InferenceSession(str(workdir / 'export' / 'convnet.onnx'))
  np.testing.assert_allclose(session.run(None, {'image': x})[0], want,
                             atol=1e-5 * np.abs(want).max())

  assert run_cli.main(args + ['--export', 'onnx-int8']) == 0, capsys.readouterr().err
  int8 = json.loads((workdir / 'export' / 'convnet.int8.onnx.json').read_text())['int8']
  assert int8['images'] == 9 and int8['calibration_images'] == 18   # every training image
  assert int8['float32_accuracy'] == pytest.approx(check['reference_accuracy'])


def test_the_check_refuses_other_logits_and_keeps_nothing(tmp_path, test_split):
  images, labels = test_split[0][:16], test_split[1][:16]
  model = models.get_model('lenet5', num_classes=10, in_channels=1)
  # jit: an eager init dispatches op by op (minutes for MobileNet V2 on 2 busy cores)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(images[:1]))
  reference = export.check.jax_logits(model, variables, images)
  agreement = export.to_onnx(model, variables, tmp_path / 'ok.onnx', images, labels,
                             reference=reference)
  assert agreement.max_relative_error <= 1e-5 and (tmp_path / 'ok.onnx').exists()
  wrong = reference.copy()
  wrong[3] += 1e-3 * np.abs(reference).max()
  with pytest.raises(ExportError, match='differs from the JAX model on 16 test images'):
    export.to_onnx(model, variables, tmp_path / 'bad.onnx', images, labels, reference=wrong)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ok.onnx']


def test_an_op_jax2onnx_lacks_is_named():
  import flax.linen as nn
  from jax.extend import random as jex_random

  class Hashed(nn.Module):  # threefry2x32: a primitive jax2onnx has no conversion for
    @nn.compact
    def __call__(self, x, train=False):
      bits = jex_random.threefry_2x32(jnp.zeros(2, jnp.uint32), jnp.arange(4, dtype=jnp.uint32))
      return x.mean(axis=(1, 2)) + bits[:3].astype(jnp.float32)

  with pytest.raises(ExportError, match='cannot convert Hashed: .* ops? threefry2x32'):
    export.onnx_model.export(Hashed(), {}, (4, 4, 3), name='Hashed')


def test_stack_and_unstack_export():
  """JAX's stack primitive (and unstack, JAX 0.12), which jax2onnx lacks, are rewritten."""
  import flax.linen as nn

  class Restack(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      a, b, c = jnp.unstack(x.mean(axis=(1, 2)), axis=1)
      return jnp.stack([a * 2, b, c - 1], axis=1)

  x = np.random.default_rng(0).normal(size=(3, 4, 4, 3)).astype(np.float32)
  blob = export.onnx_model.export(Restack(), {}, (4, 4, 3), name='Restack')
  got = export.check.batched(export.onnx_model.runner(blob), x, 3)
  np.testing.assert_allclose(got, np.asarray(Restack().apply({}, x)), rtol=1e-6, atol=1e-6)


# One model per zoo family, small: (name, options, input side, channels).
FAMILIES = [
    ('tutorial_net', {}, 32, 3),
    ('convnet', {}, 32, 3),
    ('small_resnet', {}, 32, 3),
    ('airbench94', {'widths': (8, 16, 16)}, 32, 3),
    ('googlenet', {}, 32, 3),
    ('inception_v3', {}, 75, 3),
    ('resnet18', {'num_filters': 8}, 32, 3),
    ('resnext50_32x4d', {'num_filters': 8, 'groups': 4, 'width_per_group': 16}, 32, 3),
    ('densenet121', {'growth_rate': 8, 'block_config': (2, 2, 2, 2), 'num_init_features': 16},
     32, 3),
    ('squeezenet1_1', {}, 32, 3),
    ('mobilenet_v2', {}, 32, 3),
    ('mobilenet_v3_small', {}, 32, 3),
    ('mnasnet0_5', {}, 32, 3),
    ('shufflenet_v2_x0_5', {}, 32, 3),
    ('efficientnet_b0', {'stages': (('mbconv', 1, 3, 1, 16, 16, 1), ('mbconv', 4, 5, 2, 16, 24, 1)),
                         'last_channel': 64}, 32, 3),
    ('efficientnet_v2_s', {'stages': (('fused', 1, 3, 1, 16, 16, 1), ('fused', 4, 3, 2, 16, 24, 1),
                                      ('mbconv', 4, 3, 2, 24, 32, 1)), 'last_channel': 64}, 32, 3),
    ('regnet_x_400mf', {'depth': 4, 'w_0': 16, 'w_a': 8.0, 'w_m': 2.0, 'group_width': 8,
                        'stem_width': 8}, 32, 3),
    ('regnet_y_400mf', {'depth': 4, 'w_0': 16, 'w_a': 8.0, 'w_m': 2.0, 'group_width': 8,
                        'stem_width': 8}, 32, 3),
    ('convnext_tiny', {'stages': ((16, 1), (32, 1))}, 32, 3),
]
# AlexNet's and VGG's classifiers hold 4096 x 4096 weights at any input or width (58M and 20M
# parameters here): through every runtime they take minutes on 2 cores, so only the full matrix.
if os.environ.get('CNNJAX_TEST_FULL_MATRIX') == '1':
  FAMILIES += [('alexnet', {}, 64, 3), ('vgg11_bn', {'widths': (8, 8, 16, 16, 16)}, 32, 3)]
else:
  # Each family costs one to three minutes on 2 cores (jax2onnx's tracing, then onnxruntime's
  # and XLA's compiles): the default suite exports three that between them hold every kind of
  # op the zoo uses (conv, BN, pooling, residual adds; depthwise conv, squeeze-excite,
  # hard-swish; LayerNorm, layer scale, GELU); CNNJAX_TEST_FULL_MATRIX=1 exports all of them.
  FAMILIES = [f for f in FAMILIES if f[0] in ('resnet18', 'mobilenet_v3_small', 'convnext_tiny')]


# Running a StableHLO artifact compiles the model a second time (the JAX reference is the first):
# these families run theirs; the others are exported, serialized and reloaded (the batch-
# polymorphic lowering is what can fail there) and run in the full matrix.
RUN_STABLEHLO = {'resnet18', 'googlenet', 'mobilenet_v3_small', 'convnext_tiny'}


@pytest.mark.parametrize('name,options,side,channels', FAMILIES,
                         ids=[f[0] for f in FAMILIES])
def test_every_family_exports_to_stablehlo_and_onnx(name, options, side, channels, tmp_path):
  model = models.get_model(name, num_classes=10, in_channels=channels, **options)
  images = np.random.default_rng(0).normal(size=(2, side, side, channels)).astype(np.float32)
  # jit: an eager init dispatches op by op (minutes for MobileNet V2 on 2 busy cores)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(images[:1]))
  if 'batch_stats' in variables:  # BatchNorm with statistics of its own, as after training
    rng = np.random.default_rng(1)
    variables = {**variables, 'batch_stats': jax.tree.map(
        lambda a: np.asarray(a) + rng.uniform(0.1, 0.5, a.shape).astype(np.float32),
        variables['batch_stats'])}
  reference = export.check.jax_logits(model, variables, images)
  agreement = export.to_onnx(model, variables, tmp_path / f'{name}.onnx', images,
                             reference=reference)
  assert agreement.max_relative_error <= 1e-5 and agreement.top1_mismatches == 0
  if name in RUN_STABLEHLO or os.environ.get('CNNJAX_TEST_FULL_MATRIX') == '1':
    agreement = export.to_stablehlo(model, variables, tmp_path / f'{name}.stablehlo', images,
                                    reference=reference)
    assert agreement.max_relative_error <= 1e-5 and agreement.top1_mismatches == 0
  else:
    exported = export.stablehlo.export(model, variables, images.shape[1:])
    export.stablehlo.save(exported, tmp_path / f'{name}.stablehlo')
    reloaded = export.stablehlo.load(tmp_path / f'{name}.stablehlo')
    assert str(reloaded.in_avals[0].shape[0]) == 'b'
    assert tuple(reloaded.in_avals[0].shape[1:]) == (side, side, channels)
    assert tuple(reloaded.out_avals[0].shape[1:]) == (10,)
