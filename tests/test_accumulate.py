"""Gradient accumulation (train.accumulate_steps): one step in k micro-batches equals one step
on the whole batch and optax.MultiSteps over k calls; 8 devices (jit and pmap) follow one.

The 8 simulated devices need a fresh JAX: that part runs in a child process (this file run as a
script, tests/eight_devices.py), as tests/test_parallel.py does.
"""
from __future__ import annotations

import numpy as np
import pytest

import eight_devices

K, BATCH = 4, 32


def test_k_micro_batches_equal_the_large_batch_and_optax_multisteps():
  """Two optimizer steps of LeNet-5 (no BatchNorm) with momentum and a learning rate that
  changes every step: accumulate_steps=4 at batch 32 == accumulate_steps=1 at batch 32 ==
  optax.MultiSteps(every_k_schedule=4) fed the four micro-batches of 8 one call at a time."""
  import chex
  import jax
  import optax
  from cnnjax import data, models, optim, train

  ds = data.load_dataset('mnist5k')
  batches = [{'image': ds.x_train[i * BATCH:(i + 1) * BATCH],
              'label': ds.y_train[i * BATCH:(i + 1) * BATCH]} for i in range(2)]
  model = models.get_model('lenet5', num_classes=10, in_channels=1)
  variables = jax.device_get(train.init_variables(model, (28, 28, 1), jax.random.key(0)))
  tx, schedule = optim.make_optimizer({'name': 'sgd', 'lr': 0.05, 'momentum': 0.9},
                                      {'name': 'linear', 'final_fraction': 0.1}, 2, 2,
                                      variables['params'])
  assert float(schedule(0)) != float(schedule(1))
  plain = train.StepRecipe(mean=ds.mean, std=ds.std)
  accumulating = train.StepRecipe(mean=ds.mean, std=ds.std, accumulate_steps=K)

  def run(recipe, optimizer, feed):
    state = train.create_train_state(model, variables, optimizer, jax.random.key(1))
    losses = []
    for batch in feed:
      state, metrics = train.jit_train_step(state, batch, recipe)
      losses.append(float(metrics['loss']))
    return jax.device_get(state.params), losses

  whole, whole_losses = run(plain, tx, batches)
  accumulated, accumulated_losses = run(accumulating, tx, batches)
  micro = [{k: np.asarray(v)[i::K] for k, v in batch.items()} for batch in batches
           for i in range(K)]  # micro-batch i: rows i, i + K, ... (train.micro_batches)
  multisteps, _ = run(plain, optax.MultiSteps(tx, every_k_schedule=K), micro)
  chex.assert_trees_all_close(accumulated, whole, rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_close(accumulated, multisteps, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(accumulated_losses, whole_losses, rtol=1e-5)
  assert not np.allclose(whole['fc3']['kernel'], variables['params']['fc3']['kernel'])
  np.testing.assert_array_equal(
      train.micro_batches(np.arange(12), 3), [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])


def test_a_batch_that_does_not_split_into_micro_batches_is_refused():
  from cnnjax import train
  from cnnjax.errors import BatchSplitError
  train.check_micro_batches(per_device=8, k=4, devices=8)
  with pytest.raises(BatchSplitError, match=(
      r'train.batch_size=48 is 6 per device, which does not split into '
      r'train.accumulate_steps=4 micro-batches; set train.batch_size to a multiple of 32, e.g. '
      r'train.batch_size=64.')):
    train.check_micro_batches(per_device=6, k=4, devices=8)


# ---------------------------------------------------------------------------------------------
# 8 devices, in a child process

STEPS = 3


def _child() -> dict:
  import jax
  import optax

  images, labels = eight_devices.random_batches(STEPS, BATCH)
  variables = eight_devices.initial_variables()

  def trajectory(mode, devices):
    *_, state, _ = eight_devices.train_tiny_net(
        mode, devices, variables, optax.sgd(0.05, momentum=0.9), images, labels, ema=True,
        crop_padding=2, flip=True, accumulate_steps=2, ema_decay=0.5)
    return {k: np.asarray(v) for k, v in jax.device_get(
        eight_devices.flat_variables(state, 'params', 'batch_stats', 'ema')).items()}

  reference = trajectory('jit', jax.devices()[:1])
  out = {}
  for mode in ('jit', 'pmap'):
    got = trajectory(mode, None)
    out[mode] = max(eight_devices.relative_error(got[k], v) for k, v in reference.items())
  out['ema_moved'] = bool(np.any(reference['ema/params/fc/kernel']
                                 != reference['params/fc/kernel']))
  return out


@pytest.mark.slow
def test_eight_devices_accumulate_and_average_like_one():
  result = eight_devices.run_child(__file__)
  assert result['jit'] <= 1e-5 and result['pmap'] <= 1e-5, result
  assert result['ema_moved']


if __name__ == '__main__':
  eight_devices.child_main(_child)
