"""The weights' moving average (train.ema_decay): timm's update, inside the step, evaluated,
checkpointed, resumed exactly, and what transfer.init_from reads."""
from __future__ import annotations

import json
import shutil
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import checkpoint, data, ema, models, optim, train, transfer
from cnnjax import config as config_lib
from cnnjax import runner
from cnnjax.errors import CheckpointError, ConfigError


@pytest.mark.parametrize('warmup_power', [0.0, 0.75])
def test_update_matches_timm_model_ema(warmup_power):
  """Five updates of a Linear + BatchNorm1d whose weights and running statistics jump around:
  timm's ModelEmaV2 (constant decay) and ModelEmaV3 with use_warmup (called with step=t as
  timm's train.py does) against ema.init / ema.decay_at / ema.update."""
  torch = pytest.importorskip('torch')
  timm_ema = pytest.importorskip('timm.utils.model_ema')
  model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
  if warmup_power:
    reference = timm_ema.ModelEmaV3(model, decay=0.9, use_warmup=True, warmup_power=warmup_power)
  else:
    reference = timm_ema.ModelEmaV2(model, decay=0.9)

  def as_variables(m):
    sd = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    return {'params': {'fc': {'kernel': sd['0.weight'], 'bias': sd['0.bias']},
                       'bn': {'scale': sd['1.weight'], 'bias': sd['1.bias']}},
            'batch_stats': {'bn': {'mean': sd['1.running_mean'], 'var': sd['1.running_var']}}}

  average = ema.init(as_variables(model))
  rng = np.random.default_rng(0)
  for t in range(1, 6):
    model.load_state_dict({k: torch.tensor(rng.normal(size=v.shape).astype(np.float32)) + 1
                           if v.is_floating_point() else v for k, v in model.state_dict().items()})
    reference.update(model, step=t) if warmup_power else reference.update(model)
    new = as_variables(model)
    average = ema.update(average, new['params'], new['batch_stats'],
                         ema.decay_at(jnp.int32(t), 0.9, warmup_power))
    chex.assert_trees_all_close(average, as_variables(reference.module), rtol=1e-6, atol=1e-7)
  assert float(ema.decay_at(jnp.int32(1), 0.9, warmup_power)) == pytest.approx(
      0.0 if warmup_power else 0.9)


@pytest.fixture(scope='module')
def digits():
  ds = data.load_dataset('mnist5k')
  return ds, {'image': ds.x_train[:32], 'label': ds.y_train[:32]}


def test_the_step_keeps_the_average_of_params_and_bn_statistics(digits):
  ds, batch = digits
  model = models.get_model('convnet', num_classes=10, in_channels=1, widths=(4, 8, 8), hidden=16)
  variables = train.init_variables(model, ds.x_train.shape[1:], jax.random.key(0))
  tx, _ = optim.make_optimizer({'name': 'adam', 'lr': 3e-3}, None, 10, 100, variables['params'])
  recipe = train.StepRecipe(mean=ds.mean, std=ds.std, ema_decay=0.8)
  runs = {}
  for on in (True, False):
    state = train.create_train_state(model, jax.device_get(variables), tx, jax.random.key(1),
                                     ema=on)
    history = [jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})]
    for _ in range(3):
      state, _ = train.jit_train_step(state, batch, recipe if on else train.StepRecipe(
          mean=ds.mean, std=ds.std))
      history.append(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))
    runs[on] = state, history
  state, history = runs[True]
  expected = history[0]
  for weights in history[1:]:
    expected = jax.tree.map(lambda e, w: 0.8 * e + 0.2 * w, expected, weights)
  chex.assert_trees_all_close(jax.device_get(state.ema), expected, rtol=1e-5, atol=1e-7)
  assert not np.allclose(state.ema['batch_stats']['bn1']['mean'],
                         state.batch_stats['bn1']['mean'])  # an average, not a copy
  assert runs[False][0].ema is None
  # Keeping an average does not change training.
  chex.assert_trees_all_close(runs[False][1], history, rtol=1e-6, atol=1e-7)


SMALL = ['model.name=convnet', 'model.kwargs.widths=(4,8,8)', 'model.kwargs.hidden=16',
         'data.classes=(0,1)', 'train.batch_size=32', 'train.num_steps=6',
         'train.eval_every_steps=3', 'checkpoint.every_steps=3', 'checkpoint.keep=3',
         'train.progress_bar=false', 'optimizer.name=adam', 'optimizer.lr=0.003',
         'train.ema_decay=0.7', 'train.ema_warmup_power=0.75', 'data.crop_padding=2',
         'train.accumulate_steps=2']  # the resume test covers accumulation too


def _config(*extra):
  config = config_lib.base_config()
  config_lib.apply_overrides(config, SMALL + list(extra))
  return config


def _state_at(workdir, step):
  """The whole saved train state of `step` (params, batch_stats, opt_state, rng, ema)."""
  handler = checkpoint.ocp.PyTreeCheckpointHandler()
  with warnings.catch_warnings():  # orbax: no sharding given, it reads the saved one (1 device)
    warnings.filterwarnings('ignore', 'Sharding info not provided')
    return jax.device_get(handler.restore(workdir / 'checkpoints' / str(step) / 'state'))


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ema')
  return workdir, runner.run(_config(), workdir)


def test_a_run_evaluates_both_weights_and_checkpoints_the_average(ema_run):
  workdir, result = ema_run
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['split']) for r in rows if r['split'].startswith('test')] == [
      (3, 'test'), (3, 'test_ema'), (6, 'test'), (6, 'test_ema')]
  saved = _state_at(workdir, 6)
  assert result['final_test_ema_accuracy'] == next(
      r['accuracy'] for r in rows if r['split'] == 'test_ema' and r['step'] == 6)
  assert result['final_test_accuracy'] is not None
  metrics = checkpoint.Checkpoints(workdir / 'checkpoints', _config().checkpoint).evaluations()
  assert {'test_accuracy', 'test_ema_accuracy', 'test_ema_loss'} <= set(metrics[6])
  # load_variables (transfer, --visualize) reads the average; ema=False the trained weights.
  averaged, _ = checkpoint.load_variables(workdir)
  trained, _ = checkpoint.load_variables(workdir, ema=False)
  chex.assert_trees_all_equal(averaged, {k: saved['ema'][k] for k in averaged})
  chex.assert_trees_all_equal(trained, {k: saved[k] for k in trained})
  assert not np.array_equal(averaged['params']['fc1']['kernel'], trained['params']['fc1']['kernel'])


def test_transfer_init_from_a_workdir_reads_its_average(ema_run, capsys):
  workdir, _ = ema_run
  model = models.get_model('convnet', num_classes=2, in_channels=1, widths=(4, 8, 8), hidden=16)
  fresh = jax.device_get(train.init_variables(model, (28, 28, 1), jax.random.key(5)))
  loaded = transfer.init_from_pretrained(fresh, _config(f'transfer.init_from={workdir}').transfer,
                                         'convnet')
  assert '(its moving average of the weights)' in capsys.readouterr().out
  chex.assert_trees_all_equal(jax.device_get(loaded), checkpoint.load_variables(workdir)[0])


def test_resume_continues_the_average_exactly(ema_run, tmp_path):
  workdir, _ = ema_run
  copy = tmp_path / 'resumed'
  shutil.copytree(workdir / 'checkpoints', copy / 'checkpoints',
                  ignore=shutil.ignore_patterns('6'))
  runner.run(_config(), copy)
  chex.assert_trees_all_equal(_state_at(copy, 6), _state_at(workdir, 6))
  with pytest.raises(CheckpointError, match='written with a moving average of the weights'):
    runner.run(_config('train.ema_decay=0.0', 'train.ema_warmup_power=0.0'), copy)


@pytest.mark.parametrize('fields,match', [
    (['train.ema_decay=1.0'], r'train.ema_decay must be in \[0, 1\)'),
    (['train.ema_decay=0.0'], r'ema_warmup_power must be >= 0 and needs train.ema_decay > 0'),
])
def test_bad_ema_settings(fields, match, tmp_path):
  with pytest.raises(ConfigError, match=match):
    runner.run(_config(*fields), tmp_path)
  assert not any(tmp_path.iterdir())
