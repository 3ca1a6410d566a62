"""Gradient accumulation (train.accumulate_steps): one step in k micro-batches equals one step
on the whole batch and optax.MultiSteps over k calls; 8 devices (jit and pmap) follow one.

The 8 simulated devices need a fresh JAX: that part runs in a child process (this file run as a
script), as tests/test_parallel.py does.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
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

STEPS, DEVICES = 3, 8


def _child() -> dict:
  import jax
  jax.config.update('jax_num_cpu_devices', DEVICES)
  import flax
  import flax.linen as nn
  import optax

  from cnnjax import layers, parallel, train

  class TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> fc: BN couples the rows of each micro-batch."""
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train=False):
      x = layers.Conv2d(8, 3, padding=1, use_bias=False, name='conv1')(x)
      x = layers.BatchNorm(axis_name=self.bn_axis_name, name='bn1')(x, not train)
      return layers.Linear(5, name='fc')(layers.GlobalAvgPool()(nn.relu(x)))

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (STEPS, BATCH, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, (STEPS, BATCH)).astype(np.int32)
  variables = jax.device_get(train.init_variables(TinyNet(), (8, 8, 3), jax.random.key(1)))

  def trajectory(mode, devices):
    strategy = parallel.DataParallel.create(mode, devices)
    state = train.create_train_state(TinyNet(bn_axis_name=strategy.axis_name), variables,
                                     optax.sgd(0.05, momentum=0.9), jax.random.key(2), ema=True)
    recipe = train.StepRecipe(mean=(127.5,) * 3, std=(64.0,) * 3, axis_name=strategy.axis_name,
                              crop_padding=2, flip=True, accumulate_steps=2, ema_decay=0.5)
    state = strategy.put_state(state)
    for step in range(STEPS):
      batch = strategy.put_batch({'image': images[step], 'label': labels[step]})
      state, _ = strategy.train_step(state, batch, recipe)
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(
        {'params': state.params, 'batch_stats': state.batch_stats, 'ema': state.ema}),
        sep='/').items()}

  reference = trajectory('jit', jax.devices()[:1])
  out = {}
  for mode in ('jit', 'pmap'):
    got = trajectory(mode, None)
    out[mode] = max(float(np.linalg.norm(got[k] - v) / max(np.linalg.norm(v), 1e-30))
                    for k, v in reference.items())
  out['ema_moved'] = bool(np.any(reference['ema/params/fc/kernel']
                                 != reference['params/fc/kernel']))
  return out


@pytest.mark.slow
def test_eight_devices_accumulate_and_average_like_one():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['jit'] <= 1e-5 and result['pmap'] <= 1e-5, result
  assert result['ema_moved']


if __name__ == '__main__':
  print(json.dumps(_child()))
