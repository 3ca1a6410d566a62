"""Mixup and CutMix against timm's `Mixup` (batch mode) given the same draws, their sampling,
and mixup/cutmix with random erasing on 8 devices: pmap, jit and one device train alike
(RandAugment's per-image draws come from the global index as erasing's do; tests/test_autoaugment.py
checks that a batch split at any index augments like the whole batch).

timm is the reference (`pip install timm`; these tests skip without it): its lambda, switch and
box centre come from numpy's global generator, which the tests replace by the draws they give
cnnjax. torchvision's v2 MixUp/CutMix pair image i with i - 1 (`roll`) instead of timm's
N - 1 - i (`flip`) and draw CutMix boxes differently, so they are not the reference here.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.data import mixing

ROOT = pathlib.Path(__file__).resolve().parent.parent
N, C, H, W, K = 6, 3, 10, 12, 5   # non-square: catches swapped box axes


def _batch():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(N, H, W, C)).astype(np.float32),
          rng.integers(0, K, N).astype(np.int32))


@pytest.fixture(scope='module')
def cnnjax_mix():
  def mix(images, labels, lam, use_cutmix, cy, cx, smoothing):
    draws = {'lam': lam, 'use_cutmix': use_cutmix, 'cy': cy, 'cx': cx}
    mixed, kept = mixing.mix_images(images, images[::-1], draws)
    return mixed, mixing.mix_targets(labels, labels[::-1], kept, K, smoothing)
  return jax.jit(mix, static_argnames='smoothing')


# (mixup_alpha, cutmix_alpha, lam, use_cutmix, cy, cx): mixup; a box inside; a box clipped at
# the corner (lambda corrected to the kept area); cutmix alone; lam 1 (no mixing drawn).
CASES = [(0.2, 1.0, 0.3125, False, 0, 0), (0.2, 1.0, 0.75, True, 5, 6),
         (0.2, 1.0, 0.3125, True, 1, 11), (0.0, 1.0, 0.5, True, 9, 0),
         (0.8, 0.0, 1.0, False, 3, 3)]


@pytest.mark.parametrize('mixup_alpha, cutmix_alpha, lam, use_cutmix, cy, cx', CASES)
def test_mixed_batch_and_targets_equal_timm(cnnjax_mix, monkeypatch, mixup_alpha, cutmix_alpha,
                                            lam, use_cutmix, cy, cx):
  torch = pytest.importorskip('torch')
  timm_mixup = pytest.importorskip('timm.data.mixup')
  images, labels = _batch()
  smoothing = 0.1
  # timm's batch draws, in its order: rand() < prob, [rand() < switch_prob], beta, randint x2.
  rands = iter([0.0] + ([0.0 if use_cutmix else 0.99] if mixup_alpha and cutmix_alpha else []))
  centre = iter([cy, cx])
  monkeypatch.setattr(np.random, 'rand', lambda *a: next(rands))
  monkeypatch.setattr(np.random, 'beta', lambda a, b, size=None: lam)
  monkeypatch.setattr(np.random, 'randint', lambda low, high, size=None: next(centre))
  reference = timm_mixup.Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=1.0,
                               switch_prob=0.5, mode='batch', label_smoothing=smoothing,
                               num_classes=K)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  x_ref, y_ref = reference(x, torch.from_numpy(labels).long())
  x_ref = x_ref.numpy().transpose(0, 2, 3, 1)
  got_x, got_y = cnnjax_mix(images, labels, np.float32(lam), use_cutmix, cy, cx, smoothing)
  np.testing.assert_allclose(np.asarray(got_x), x_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_y), y_ref.numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got_y).sum(-1), 1.0, rtol=1e-6)
  if use_cutmix:  # the box really is pasted (and clipped) where timm pastes it
    assert not np.array_equal(np.asarray(got_x), images)


def test_draws_follow_the_spec():
  """One decision per batch: mixed with probability prob, cutmix with switch_prob, lambda ~
  Beta(alpha, alpha) (mean 1/2; Beta(0.2, 0.2) puts most mass near 0 and 1)."""
  spec = mixing.MixSpec(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.8, switch_prob=0.25,
                        num_classes=K)
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.jit(jax.vmap(lambda k: mixing.draw(k, spec, H, W)))(keys)
  lam, cut = np.asarray(draws['lam']), np.asarray(draws['use_cutmix'])
  mixed = lam < 1
  assert abs(mixed.mean() - 0.8) < 0.03
  assert abs(cut.sum() / mixed.sum() - 0.25) < 0.03
  assert abs(lam[mixed].mean() - 0.5) < 0.03
  mixup_lam = lam[mixed & ~cut]
  assert ((mixup_lam < 0.1) | (mixup_lam > 0.9)).mean() > 0.5   # Beta(0.2, 0.2)'s U shape
  assert 0.45 < ((lam[cut] > 0.25) & (lam[cut] < 0.75)).mean() < 0.55  # Beta(1, 1) is uniform
  cy, cx = np.asarray(draws['cy']), np.asarray(draws['cx'])
  assert cy.min() == 0 and cy.max() == H - 1 and cx.min() == 0 and cx.max() == W - 1


def test_spec_rejects_bad_settings():
  from cnnjax.errors import ConfigError
  with pytest.raises(ConfigError, match='mix_prob'):
    mixing.MixSpec(mixup_alpha=0.2, prob=1.5)
  with pytest.raises(ConfigError, match='>= 0'):
    mixing.MixSpec(mixup_alpha=-1.0)
  assert not mixing.MixSpec().active and not mixing.MixSpec(mixup_alpha=0.2, prob=0.0).active


# ---------------------------------------------------------------------------------------------
# 8 devices: mixing (the mirror partner crosses devices) and erasing train a tiny network alike
# under pmap, jit and one device.

STEPS, BATCH, DEVICES = 3, 16, 8


def _child() -> dict:
  jax.config.update('jax_num_cpu_devices', DEVICES)
  import flax
  import flax.linen as nn
  import optax

  from cnnjax import layers, parallel, train

  class TinyNet(nn.Module):
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train=False):
      x = layers.Conv2d(4, 3, padding=1, use_bias=False, name='conv1')(x)
      x = layers.BatchNorm(axis_name=self.bn_axis_name, name='bn1')(x, not train)
      return layers.Linear(K, name='fc')(layers.GlobalAvgPool()(nn.relu(x)))

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (STEPS, BATCH, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, K, (STEPS, BATCH)).astype(np.int32)
  variables = jax.device_get(train.init_variables(TinyNet(), (8, 8, 3), jax.random.key(1)))
  out = {}
  for mode, devices in (('jit', 1), ('jit', DEVICES), ('pmap', DEVICES)):
    strategy = parallel.DataParallel.create(mode, jax.devices()[:devices])
    state = strategy.put_state(train.create_train_state(
        TinyNet(bn_axis_name=strategy.axis_name), variables, optax.sgd(0.1), jax.random.key(2)))
    recipe = train.StepRecipe(
        mean=(127.5,) * 3, std=(64.0,) * 3, axis_name=strategy.axis_name, flip=True,
        label_smoothing=0.1, random_erasing=0.5, mixing=mixing.MixSpec(0.2, 1.0, num_classes=K))
    losses = []
    for step in range(STEPS):
      batch = strategy.put_batch({'image': images[step], 'label': labels[step]})
      state, metrics = strategy.train_step(state, batch, recipe)
      losses.append(float(metrics['loss']))
    leaves = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
    out[f'{mode}-{devices}'] = {'loss': losses,
                                'params': {k: np.asarray(v).tolist() for k, v in leaves.items()}}
  return out


@pytest.fixture(scope='module')
def eight_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('run', ['jit-8', 'pmap-8'])
def test_eight_devices_mix_erase_and_augment_like_one(eight_devices, run):
  reference, got = eight_devices['jit-1'], eight_devices[run]
  np.testing.assert_allclose(got['loss'], reference['loss'], rtol=1e-5)
  for name, value in reference['params'].items():
    np.testing.assert_allclose(got['params'][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


if __name__ == '__main__':
  print(json.dumps(_child()))
