"""Visualizations: the PNG writers on known arrays, and `run.py --visualize` from a checkpoint."""
from __future__ import annotations

import json
import pathlib
import sys

import matplotlib.image
import numpy as np
import pytest
from mlxtend.evaluate import confusion_matrix as mlxtend_confusion_matrix

from cnnjax import viz

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _read(path: pathlib.Path) -> np.ndarray:
  assert path.is_file() and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', path
  return matplotlib.image.imread(path)[..., :3]


def test_confusion_matrix_matches_mlxtend():
  rng = np.random.default_rng(0)
  labels, predictions = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
  matrix = viz.confusion_matrix(labels, predictions, 7)
  np.testing.assert_array_equal(matrix, mlxtend_confusion_matrix(labels, predictions))
  # A class nobody predicts still gets its column (mlxtend would drop it).
  assert viz.confusion_matrix([0, 1, 2], [0, 0, 0], 4).shape == (4, 4)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 4\)'):
    viz.confusion_matrix([0, 5], [0, 1], 4)


def test_confusion_matrix_png_shows_the_accuracy(tmp_path):
  matrix = viz.confusion_matrix([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], 3)
  image = _read(viz.plot_confusion_matrix(matrix, tmp_path / 'cm.png', ['a', 'b', 'c']))
  # The diagonal of row-normalized recall is dark blue where recall is 1 (rows a and c).
  dark_blue = (image[..., 2] > 0.25) & (image[..., 0] < 0.15) & (image[..., 1] < 0.3)
  assert dark_blue.sum() > 500


def test_rgb_filters_keep_their_colour(tmp_path):
  kernel = np.zeros((5, 5, 3, 4), np.float32)
  kernel[:, :, 0, 0] = np.linspace(0, 1, 25).reshape(5, 5)   # filter 0: only red
  kernel[:, :, 2, 1] = np.linspace(0, 1, 25).reshape(5, 5)   # filter 1: only blue
  image = _read(viz.plot_filters(kernel, tmp_path / 'filters.png'))
  red = (image[..., 0] > 0.8) & (image[..., 1] < 0.2) & (image[..., 2] < 0.2)
  blue = (image[..., 2] > 0.8) & (image[..., 0] < 0.2) & (image[..., 1] < 0.2)
  assert red.sum() > 100 and blue.sum() > 100


def test_activation_grid_and_dense_features(tmp_path):
  maps = np.zeros((1, 6, 6, 20), np.float32)
  maps[0, :3, :, :] = 1.0                                     # top half bright in every map
  image = _read(viz.plot_activations(maps, tmp_path / 'act.png', image=np.zeros((6, 6, 1)),
                                     title='conv2', max_maps=16))
  yellow = (image[..., 0] > 0.9) & (image[..., 1] > 0.85) & (image[..., 2] < 0.3)  # viridis max
  assert yellow.sum() > 16 * 50
  assert _read(viz.plot_activations(np.arange(10.0)[None], tmp_path / 'fc.png')).std() > 0
  with pytest.raises(ValueError, match='one image'):
    viz.plot_activations(np.zeros((2, 4, 4, 3)), tmp_path / 'x.png')


@pytest.mark.parametrize('name, kwargs, first', [
    ('airbench94', dict(widths=(4, 8, 8)), 'whiten'),   # sorted keys would give group1/conv1
    ('small_resnet', {}, 'conv1'),
])
def test_first_conv_is_the_first_one_the_model_calls(name, kwargs, first):
  import jax
  from cnnjax import inspect_run, models
  model = models.get_model(name, **kwargs)
  x = np.zeros((1, 32, 32, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)

  def restored(tree):  # a checkpoint comes back with its keys sorted
    if isinstance(tree, dict):
      return {k: restored(tree[k]) for k in sorted(tree)}
    return rng.normal(size=tree.shape).astype(np.float32)
  variables = restored(dict(shapes))
  path, kernel = inspect_run.first_conv_kernel(model, variables, x)
  assert path == first
  np.testing.assert_array_equal(kernel, variables['params'][first]['kernel'])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 40-step tiny convnet run on mnist5k, trained through the CLI from an experiment file."""
  root = tmp_path_factory.mktemp('viz')
  experiment = root / 'tiny_digits.py'
  experiment.write_text(
      '"""Tiny convnet on mnist5k (test)."""\n'
      'from cnnjax import config as config_lib\n\n'
      'def get_config():\n'
      '  config = config_lib.load_experiment("quickstart")\n'
      '  config.model.name = "convnet"\n'
      '  config.model.kwargs.widths = (4, 8, 8)\n'
      '  config.model.kwargs.hidden = 16\n'
      '  config.model.kwargs.dropout = 0.0\n'
      '  config.schedule.name = "constant"\n'
      '  config.optimizer.lr = 1e-2\n'
      '  return config\n')
  sys.path.insert(0, str(ROOT))
  import run
  workdir = root / 'run'
  assert run.main(['--experiment', str(experiment), '--workdir', str(workdir),
                   '--config.train.num_steps=40', '--config.train.progress_bar=false']) == 0
  return run, experiment, workdir


def test_cli_writes_the_three_pictures(trained, capsys):
  run, experiment, workdir = trained
  capsys.readouterr()
  assert run.main(['--experiment', str(experiment), '--workdir', str(workdir),
                   '--visualize', 'conv2']) == 0
  printed = capsys.readouterr().out
  out = workdir / 'visualize'
  for name in ('activations_conv2.png', 'filters.png', 'confusion_matrix.png'):
    assert str(out / name) in printed
    assert _read(out / name).std() > 0.01
  # The confusion matrix counts the same test predictions the run's evaluation did.
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  accuracy = [r for r in rows if r['split'] == 'test'][-1]['accuracy']
  assert f'test accuracy {accuracy:.2%}' in printed


def test_cli_errors_are_one_line(trained, capsys):
  run, experiment, workdir = trained
  assert run.main(['--experiment', str(experiment), '--workdir', str(workdir),
                   '--visualize', 'layer9']) == 2
  assert "has no layer 'layer9'; valid layers: " in capsys.readouterr().err
  assert run.main(['--experiment', str(experiment), '--workdir', str(workdir / 'nothing'),
                   '--visualize', 'conv2']) == 2
  assert 'holds no checkpoint to visualize; train first' in capsys.readouterr().err
