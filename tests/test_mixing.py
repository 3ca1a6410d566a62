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

import jax
import numpy as np
import pytest

import eight_devices
from cnnjax.data import mixing

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

STEPS, BATCH, DEVICES = 3, 16, eight_devices.DEVICES


def _child() -> dict:
  import optax

  images, labels = eight_devices.random_batches(STEPS, BATCH)
  variables = eight_devices.initial_variables()
  out = {}
  for mode, devices in (('jit', 1), ('jit', DEVICES), ('pmap', DEVICES)):
    _, _, state, losses = eight_devices.train_tiny_net(
        mode, jax.devices()[:devices], variables, optax.sgd(0.1), images, labels, flip=True,
        label_smoothing=0.1, random_erasing=0.5,
        mixing=mixing.MixSpec(0.2, 1.0, num_classes=eight_devices.CLASSES))
    leaves = jax.device_get(eight_devices.flat_variables(state, 'params'))
    out[f'{mode}-{devices}'] = {'loss': losses,
                                'params': {k: np.asarray(v).tolist() for k, v in leaves.items()}}
  return out


@pytest.fixture(scope='module')
def eight_devices_run():
  return eight_devices.run_child(__file__)


@pytest.mark.parametrize('run', ['jit-8', 'pmap-8'])
def test_eight_devices_mix_erase_and_augment_like_one(eight_devices_run, run):
  reference, got = eight_devices_run['jit-1'], eight_devices_run[run]
  np.testing.assert_allclose(got['loss'], reference['loss'], rtol=1e-5)
  for name, value in reference['params'].items():
    np.testing.assert_allclose(got['params'][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


if __name__ == '__main__':
  eight_devices.child_main(_child)
