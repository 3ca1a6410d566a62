"""Data parallelism: one device, 8 devices under jit sharding and 8 under pmap train alike, and
evaluate alike on any device count (eval batches are padded to divide, padded rows masked).

The 8 simulated CPU devices need a fresh JAX, so the trajectories are computed in a child
process (this file run as a script, tests/eight_devices.py) and compared here.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

import eight_devices

STEPS, BATCH, DEVICES = 10, 32, eight_devices.DEVICES
EVAL_EXAMPLES = 1234   # divides over none of 8, 3 and 2 devices


def _child() -> dict:
  import jax
  import optax

  from cnnjax import parallel

  images, labels = eight_devices.random_batches(STEPS, BATCH)
  eval_batch = {'image': images[0], 'label': labels[0], 'mask': np.arange(BATCH) < BATCH - 5}
  variables = eight_devices.initial_variables()

  def trajectory(mode, devices, augment):
    strategy, recipe, state, losses = eight_devices.train_tiny_net(
        mode, devices, variables, optax.sgd(0.05, momentum=0.9), images, labels,
        crop_padding=2 if augment else 0, flip=augment)
    sums = strategy.eval_step(state, strategy.put_batch(eval_batch), recipe)
    leaves = eight_devices.flat_variables(state, 'params', 'batch_stats')
    replicated = all(leaf.sharding.is_fully_replicated for leaf in leaves.values())
    return (np.array(losses), {k: np.asarray(v) for k, v in leaves.items()},
            {k: float(v) for k, v in sums.items()}, replicated)

  out = {}
  for augment, modes in ((False, ('jit', 'pmap')), (True, ('jit',))):
    ref_loss, ref_params, ref_sums, _ = trajectory('jit', jax.devices()[:1], augment)
    key = 'augment' if augment else 'plain'
    out[key] = {'loss_first_last': [float(ref_loss[0]), float(ref_loss[-1])],
                'ref_eval_count': ref_sums['count']}
    for mode in modes:
      loss, params, sums, replicated = trajectory(mode, None, augment)
      out[key][mode] = {
          'loss': float(np.max(np.abs(loss - ref_loss) / np.abs(ref_loss))),
          'params': max(eight_devices.relative_error(params[k], ref_params[k])
                        for k in ref_params),
          'eval': max(abs(sums[k] - ref_sums[k]) / max(abs(ref_sums[k]), 1e-30)
                      for k in ref_sums),
          'replicated': replicated,
      }
  out['evaluate'] = _evaluations(variables)
  out['eval_batch_sizes'] = {  # (requested batch, examples): 500 of 10,000, 2000 of 100, 1 of 10
      str(n): [parallel.DataParallel.create('jit', jax.devices()[:n]).eval_batch_size(b, e)
               for b, e in ((500, 10_000), (2000, 100), (1, 10))] for n in (1, DEVICES)}
  try:
    parallel.check_batch_size(30, parallel.data_mesh())
  except parallel.BatchSplitError as e:
    out['split_error'] = str(e)
  return out


def _evaluations(variables) -> dict:
  """runner.evaluate over EVAL_EXAMPLES on 1, 3 and 8 devices in both modes, with eval batch
  sizes that divide over none of them, against one unpadded batch on one device."""
  import jax
  import optax

  from cnnjax import parallel, runner, train

  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, (EVAL_EXAMPLES, *eight_devices.IMAGE_SHAPE), dtype=np.uint8)
  y = rng.integers(0, eight_devices.CLASSES, EVAL_EXAMPLES).astype(np.int32)
  state = train.create_train_state(eight_devices.TinyNet(), variables, optax.sgd(0.1),
                                   jax.random.key(0))
  recipe = train.StepRecipe(**eight_devices.NORMALIZE)
  ref = jax.device_get(jax.jit(train.eval_step, static_argnames='recipe')(
      state, {'image': x, 'label': y}, recipe))
  out = {'reference': {'loss': float(ref['loss']) / EVAL_EXAMPLES,
                       'accuracy': float(ref['correct']) / EVAL_EXAMPLES,
                       'top5_accuracy': float(ref['correct5']) / EVAL_EXAMPLES,
                       'count': float(ref['count'])}}
  for mode in parallel.MODES:
    for devices in (1, 3, 8):
      strategy = parallel.DataParallel.create(mode, jax.devices()[:devices])
      model = eight_devices.TinyNet(bn_axis_name=strategy.axis_name)
      state = train.create_train_state(model, variables, optax.sgd(0.1), jax.random.key(0))
      recipe = train.StepRecipe(**eight_devices.NORMALIZE, axis_name=strategy.axis_name)
      state = strategy.put_state(state)
      for batch_size in (500, 7, 5000):
        out[f'{mode}-{devices}-{batch_size}'] = runner.evaluate(state, x, y, batch_size, recipe,
                                                                strategy)
  return out


@pytest.fixture(scope='module')
def result():
  return eight_devices.run_child(__file__)


@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_eight_devices_follow_the_one_device_trajectory(result, mode):
  errors = result['plain'][mode]
  assert errors['loss'] <= 1e-5, errors
  assert errors['params'] <= 1e-5, errors
  assert errors['eval'] <= 1e-5, errors
  assert errors['replicated'], 'the state between steps must be replicated on every device'
  first, last = result['plain']['loss_first_last']
  assert last < first, 'the reference run must actually train for the comparison to mean much'


def test_jit_sharding_keeps_the_augmentation_randomness(result):
  errors = result['augment']['jit']
  assert errors['loss'] <= 1e-5 and errors['params'] <= 1e-5, errors


def test_masked_rows_do_not_count(result):
  assert result['plain']['ref_eval_count'] == BATCH - 5


def test_evaluation_counts_every_example_once_on_any_device_count(result):
  evaluations = dict(result['evaluate'])
  reference = evaluations.pop('reference')
  assert reference['count'] == EVAL_EXAMPLES and 0 < reference['accuracy'] < 1
  assert len(evaluations) == 2 * 3 * 3
  for key, metrics in evaluations.items():
    assert metrics['count'] == EVAL_EXAMPLES, key
    for name in ('loss', 'accuracy', 'top5_accuracy'):
      assert metrics[name] == pytest.approx(reference[name], rel=1e-5), (key, name)


def test_global_batch_must_divide_over_devices(result):
  assert result['split_error'] == ('train.batch_size=30 does not divide over 8 devices; set '
                                   'train.batch_size to a multiple of 8, e.g. '
                                   'train.batch_size=32.')


def test_eval_batches_round_up_to_the_devices_but_not_past_the_data(result):
  assert result['eval_batch_sizes'] == {'1': [500, 100, 1], '8': [504, 104, 8]}


def test_pmap_builds_every_model_with_batch_norm_over_the_axis():
  """Models with a bn_axis_name option get the pmap axis; the others (LeNet-5, AlexNet, the
  tutorial net: no BatchNorm) are built without it instead of failing."""
  from cnnjax import config as config_lib
  from cnnjax import models, runner
  dataset = types.SimpleNamespace(num_classes=10, image_shape=(32, 32, 3))
  config = config_lib.base_config()
  without = []
  for name in models.model_names():
    config.model.name = name
    model = runner.build_model(config, dataset, bn_axis_name='data')
    if 'bn_axis_name' in models.model_options(name):
      assert model.bn_axis_name == 'data', name
    else:
      without.append(name)
  assert {'lenet5', 'alexnet', 'tutorial_net'} <= set(without)


if __name__ == '__main__':
  eight_devices.child_main(_child)
