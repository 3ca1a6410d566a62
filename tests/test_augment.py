"""On-device augmentation checked against NumPy: np.pad windows, np.flip, (x - mean) / std."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from cnnjax.data import augment

H, W, C = 6, 7, 2  # non-square, two channels: catches swapped axes


def marker_images(n: int) -> np.ndarray:
  """`n` copies of an image whose pixels are all distinct and non-zero (1..84)."""
  image = (np.arange(H * W * C, dtype=np.uint8) + 1).reshape(H, W, C)
  return np.broadcast_to(image, (n, H, W, C)).copy()


def window_offsets(out: np.ndarray, padded: np.ndarray) -> list[tuple[int, int]]:
  """For each output image, the (dy, dx) of the window of `padded` it equals (asserts one)."""
  offsets = []
  span_y, span_x = padded.shape[0] - H, padded.shape[1] - W
  for image in out:
    hits = [(dy, dx) for dy in range(span_y + 1) for dx in range(span_x + 1)
            if np.array_equal(image, padded[dy:dy + H, dx:dx + W])]
    assert len(hits) == 1, f'output is not exactly one window of the padded image: {hits}'
    offsets.append(hits[0])
  return offsets


@pytest.fixture(scope='module')
def crop_fn():
  return jax.jit(augment.random_crop, static_argnums=(2, 3))


@pytest.mark.parametrize('mode', ['constant', 'reflect'])
def test_crop_is_a_window_of_the_padded_image(crop_fn, mode):
  pad = 2
  x = marker_images(400)
  out = np.asarray(crop_fn(jax.random.key(0), x, pad, mode))
  assert out.shape == x.shape and out.dtype == np.uint8
  padded = np.pad(x[0], ((pad, pad), (pad, pad), (0, 0)), mode=mode)
  offsets = window_offsets(out, padded)
  # Offsets are drawn per image and cover all (2p + 1)^2 windows, roughly uniformly.
  counts = np.zeros((2 * pad + 1, 2 * pad + 1), int)
  for dy, dx in offsets:
    counts[dy, dx] += 1
  assert counts.min() > 0, counts
  assert counts.max() < 3 * len(x) / counts.size, counts


def test_reflect_and_zero_padding_differ(crop_fn):
  x = marker_images(400)  # the shapes of the test above: its compiled crops are reused
  key = jax.random.key(1)
  zero = np.asarray(crop_fn(key, x, 2, 'constant'))
  reflect = np.asarray(crop_fn(key, x, 2, 'reflect'))
  # Same key, same offsets: equal where the window is the centre, else zero padding shows
  # black pixels and reflect padding shows mirrored image pixels (never 0 in a marker image).
  assert (zero == 0).any()
  assert not (reflect == 0).any()
  shifted = ~np.all(zero == x, axis=(1, 2, 3))
  assert shifted.any()
  assert not np.array_equal(zero[shifted], reflect[shifted])
  np.testing.assert_array_equal(zero[~shifted], reflect[~shifted])


def test_crop_padding_zero_is_identity():
  x = marker_images(3)
  np.testing.assert_array_equal(augment.random_crop(jax.random.key(0), x, 0), x)


def test_flip_mirrors_about_half_the_images():
  x = np.random.default_rng(0).integers(0, 256, (1000, H, W, C), dtype=np.uint8)
  out = np.asarray(jax.jit(augment.random_flip)(jax.random.key(3), x))
  assert out.shape == x.shape and out.dtype == np.uint8
  mirrored = np.all(out == np.flip(x, axis=2), axis=(1, 2, 3))
  same = np.all(out == x, axis=(1, 2, 3))
  assert np.all(mirrored ^ same)  # each image is exactly itself or its left-right mirror
  assert 0.45 < mirrored.mean() < 0.55


def test_same_key_same_output_other_key_other_output(crop_fn):
  x = np.random.default_rng(1).integers(0, 256, (32, H, W, C), dtype=np.uint8)
  aug = jax.jit(functools.partial(augment.apply, crop_padding=2, pad_mode='reflect',
                                  flip=True))
  a = np.asarray(aug(jax.random.key(7), x))
  b = np.asarray(aug(jax.random.key(7), x))
  c = np.asarray(aug(jax.random.key(8), x))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.dtype == np.uint8 and a.shape == x.shape


def test_apply_is_crop_then_flip():
  pad = 1
  x = marker_images(200)
  aug = jax.jit(functools.partial(augment.apply, crop_padding=pad, pad_mode='constant',
                                  flip=True))
  out = np.asarray(aug(jax.random.key(5), x))
  padded = np.pad(x[0], ((pad, pad), (pad, pad), (0, 0)))
  flipped = np.flip(padded, axis=1)
  n_flipped = 0
  for image in out:
    windows = [p[dy:dy + H, dx:dx + W] for p in (padded, flipped)
               for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    matches = [i for i, w in enumerate(windows) if np.array_equal(image, w)]
    assert len(matches) == 1
    n_flipped += matches[0] >= len(windows) // 2
  assert 0 < n_flipped < len(out)


def test_a_slice_of_the_batch_is_augmented_as_in_the_whole_batch():
  """Per-image randomness depends on the image's global index, not on the device split: a pmap
  device holding rows 8..15 of a global batch augments them as one device holding all rows."""
  x = np.random.default_rng(0).integers(0, 255, (32, H, W, C), dtype=np.uint8)
  aug = jax.jit(functools.partial(augment.apply, crop_padding=2, pad_mode='reflect', flip=True))
  whole = np.asarray(aug(jax.random.key(3), x))
  for first in (0, 8, 24):
    part = np.asarray(aug(jax.random.key(3), x[first:first + 8], first_index=first))
    np.testing.assert_array_equal(part, whole[first:first + 8])
  assert not np.array_equal(np.asarray(aug(jax.random.key(3), x[8:16])), whole[8:16])


def test_apply_without_augmentation_is_identity():
  x = marker_images(4)
  np.testing.assert_array_equal(augment.apply(jax.random.key(0), x), x)


def test_normalize_matches_numpy():
  x = np.random.default_rng(2).integers(0, 256, (5, H, W, 3), dtype=np.uint8)
  mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
  out = jax.jit(augment.normalize, static_argnums=(1, 2))(x, mean, std)
  assert out.dtype == np.float32 and out.shape == x.shape
  expected = (x.astype(np.float64) - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise_value_error():
  x = marker_images(2)
  with pytest.raises(ValueError, match='padding mode'):
    augment.random_crop(jax.random.key(0), x, 2, 'wrap')
  with pytest.raises(ValueError, match='non-negative'):
    augment.random_crop(jax.random.key(0), x, -1)
  with pytest.raises(ValueError, match='Reflect padding'):
    augment.random_crop(jax.random.key(0), x, H, 'reflect')


# ---------------------------------------------------------------------------------------------
# Random erasing: torchvision's RandomErasing given the same uniform draws, and its effect.

def test_erasing_boxes_are_torchvisions(monkeypatch):
  torch = pytest.importorskip('torch')
  v2_augment = pytest.importorskip('torchvision.transforms.v2._augment')
  tv2 = pytest.importorskip('torchvision.transforms.v2')
  h, w = 24, 8
  draws = np.array(jax.random.uniform(jax.random.key(0), (300, 4, augment.ERASING_TRIES)))
  draws[:5, 0], draws[:5, 1] = 0.999, 0.0   # wide boxes of 1/3 of the area fit in no try
  ours = jax.jit(jax.vmap(lambda d: augment.erasing_box(d, h, w)))(draws)
  top, left, eh, ew, found = (np.asarray(a) for a in ours)
  eraser = tv2.RandomErasing(p=1.0)   # scale (0.02, 0.33), ratio (0.3, 3.3), value 0
  image = torch.zeros(3, h, w)
  none_found = 0
  for n, d in enumerate(draws):
    fake = _ScriptedTorch(torch, d)
    monkeypatch.setattr(v2_augment, 'torch', fake)
    params = eraser.make_params([image])
    monkeypatch.undo()
    if params['v'] is None:   # torchvision's "no try fitted": erase nothing
      assert not found[n], n
      none_found += 1
    else:
      assert found[n], n
      assert (params['i'], params['j'], params['h'], params['w']) == (
          top[n], left[n], eh[n], ew[n]), n
  assert 5 <= none_found < 20


class _ScriptedTorch:
  """Stands in for `torch` inside torchvision's v2 `_augment` module: each try's two `uniform_`
  calls and the successful try's two `randint` calls get the draws cnnjax's `erasing_box` uses
  (per try: area fraction, log ratio, top, left; randint(0, n) = floor(u * n))."""

  def __init__(self, torch, draws):
    self._torch = torch
    self._draws = np.asarray(draws, np.float32)
    self._uniform_calls = 0
    self._randint_calls = 0

  def __getattr__(self, name):
    return getattr(self._torch, name)

  def empty(self, *args, **kwargs):
    outer = self

    class Uniform:
      def uniform_(self, low, high):
        row, try_ = outer._uniform_calls % 2, outer._uniform_calls // 2
        outer._uniform_calls += 1
        low, high = np.float32(low), np.float32(high)
        return outer._torch.tensor([low + outer._draws[row, try_] * (high - low)])
    return Uniform()

  def randint(self, low, high, size):
    try_ = (self._uniform_calls - 1) // 2   # the try whose size fitted
    u = self._draws[2 + self._randint_calls, try_]
    self._randint_calls += 1
    return self._torch.tensor([int(np.floor(u * np.float32(high)))])


@pytest.fixture(scope='module')
def erase_fn():
  return jax.jit(augment.random_erasing, static_argnames=('prob', 'mode'))


@pytest.mark.parametrize('mode', ['zero', 'pixel'])
def test_random_erasing_fills_one_rectangle_per_chosen_image(erase_fn, mode):
  n, h, w = 400, 16, 12
  x = np.random.default_rng(0).uniform(5, 6, (n, h, w, 3)).astype(np.float32)  # never 0
  out = np.asarray(erase_fn(jax.random.key(1), x, prob=0.5, mode=mode))
  changed = out != x
  erased = changed.any(axis=(1, 2, 3))
  assert 0.4 < erased.mean() < 0.55   # p = 0.5, less the rare draws where no try fits
  areas = []
  for image, mask in zip(out[erased], changed[erased]):
    rows, cols = np.nonzero(mask.any(-1))
    box = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert mask[box].all()   # one solid rectangle, all channels
    assert mask.sum() == mask[box].size
    areas.append(mask[box].shape[0] * mask[box].shape[1] / (h * w))
    if mode == 'zero':
      assert (image[box] == 0).all()
  assert 0.02 - 0.02 <= min(areas) and max(areas) < 0.5 and 0.1 < np.mean(areas) < 0.25
  if mode == 'pixel':
    values = out[changed]
    assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1
  np.testing.assert_array_equal(erase_fn(jax.random.key(1), x[:8], prob=0.0, mode=mode), x[:8])


def test_erasing_a_slice_of_the_batch_is_erasing_it_in_the_whole_batch(erase_fn):
  x = np.ones((400, 16, 12, 3), np.float32)
  whole = np.asarray(erase_fn(jax.random.key(2), x, prob=0.5, mode='zero'))
  part = np.asarray(erase_fn(jax.random.key(2), x[:200], prob=0.5, mode='zero', first_index=200))
  np.testing.assert_array_equal(part, whole[200:])


def test_bad_erasing_settings_are_config_errors():
  from cnnjax.errors import ConfigError
  with pytest.raises(ConfigError, match='probability'):
    augment.random_erasing(jax.random.key(0), np.zeros((1, 4, 4, 1), np.float32), 1.5)
  with pytest.raises(ConfigError, match='mode'):
    augment.check_erasing(0.5, 'random')
