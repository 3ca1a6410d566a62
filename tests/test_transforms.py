"""cnnjax.data.transforms against torchvision's transforms v2 on the same images and crops.

torchvision is the oracle: the crop sampling replays torch's own random stream through
`crop_box`, and the pixels of every crop, resize and flip must equal torchvision's exactly.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from cnnjax.data import transforms

torch = pytest.importorskip('torch')
tv2 = pytest.importorskip('torchvision.transforms.v2')
F = pytest.importorskip('torchvision.transforms.v2.functional')


def _image(height, width, mode='RGB', seed=0):
  rng = np.random.default_rng(seed)
  # Smooth content (a gradient plus noise) so resizing errors would show.
  y, x = np.mgrid[0:height, 0:width]
  base = (x * 255 // max(width - 1, 1) + y * 127 // max(height - 1, 1)) % 256
  pixels = np.stack([base, 255 - base, (base * 7) % 256], -1) + rng.integers(0, 20, (height, width, 3))
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)


def _jpeg(image, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG' if image.mode != 'RGBA' else 'PNG', **kwargs)
  return buffer.getvalue()


def _torch_draws():
  """uniform/integers that draw from torch's global generator exactly as torchvision does."""
  def uniform(low, high):
    return torch.empty(1).uniform_(low, high).item()

  def integers(low, high):
    return torch.randint(low, high, size=(1,)).item()
  return uniform, integers


@pytest.mark.parametrize('height,width', [(180, 300), (500, 160), (37, 41), (12, 900)])
def test_crop_box_is_torchvisions_sampling(height, width):
  crop = tv2.RandomResizedCrop(64, scale=transforms.SCALE, ratio=transforms.RATIO)
  image = _image(height, width)
  same = 0
  for seed in range(60):
    torch.manual_seed(seed)
    expected = crop.make_params([image])
    torch.manual_seed(seed)
    top, left, h, w = transforms.crop_box(height, width, transforms.SCALE, transforms.RATIO,
                                          *_torch_draws())
    same += (top, left, h, w) == (expected['top'], expected['left'], expected['height'],
                                  expected['width'])
    assert 0 <= top <= height - h and 0 <= left <= width - w
  # torchvision takes log(ratio) in float32, we in float64: a rounding knife-edge may differ.
  assert same >= 59, same
  if (height, width) == (12, 900):  # no crop fits in 10 tries: the central fallback
    assert (top, left, h, w) == (0, (900 - 16) // 2, 12, 16)


@pytest.mark.parametrize('height,width', [(180, 300), (333, 257), (64, 64)])
def test_train_crop_and_flip_pixels_equal_torchvision(height, width):
  image = _image(height, width, seed=height)
  rng = np.random.default_rng(0)
  for _ in range(5):
    box = transforms.crop_box(height, width, transforms.SCALE, transforms.RATIO, rng.uniform,
                              rng.integers)
    ours = transforms.to_array(transforms.resized_crop(image, box, 56))
    theirs = F.resized_crop(image, *box, size=[56, 56], antialias=True)
    np.testing.assert_array_equal(ours, np.asarray(theirs))
    np.testing.assert_array_equal(ours[:, ::-1], np.asarray(F.horizontal_flip(theirs)))


def test_train_transform_is_deterministic_per_rng_and_flips_half():
  data = _jpeg(_image(200, 240))
  t = transforms.TrainTransform(size=32, channels=3)
  a = t(data, np.random.default_rng(5))
  b = t(data, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  # Flip decided by the last draw: with scale (1, 1) and ratio matching, the crop is the whole
  # image, so an output equals the plain resize or its mirror.
  whole = transforms.TrainTransform(size=32, channels=3, scale=(1.0, 1.0), ratio=(1.2, 1.2))
  plain = transforms.to_array(transforms.decode(data, 3).resize((32, 32), Image.BILINEAR))
  flips = 0
  for seed in range(40):
    out = whole(data, np.random.default_rng(seed))
    if np.array_equal(out, plain[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out, plain)
  assert 8 <= flips <= 32, flips


@pytest.mark.parametrize('height,width,size', [(375, 500, 224), (500, 333, 64), (150, 151, 64),
                                               (73, 90, 64)])
def test_eval_transform_equals_torchvision_resize_and_center_crop(height, width, size):
  data = _jpeg(_image(height, width, seed=width))
  resize = int(size / 0.875)
  expected = tv2.Compose([tv2.Resize(resize, antialias=True), tv2.CenterCrop(size)])(
      transforms.decode(data, 3))
  ours = transforms.EvalTransform(size=size, channels=3)(data)
  assert ours.shape == (size, size, 3)
  np.testing.assert_array_equal(ours, np.asarray(expected))
  assert transforms.eval_resize(224) == 256


@pytest.mark.parametrize('mode', ['L', 'CMYK', 'RGBA', 'P', 'LA', 'I;16'])
def test_any_mode_becomes_the_datasets_channels_as_imagefolder_converts(mode):
  image = _image(40, 50).convert(mode) if mode != 'I;16' else Image.fromarray(
      (np.arange(2000, dtype=np.uint16).reshape(40, 50) * 30))
  buffer = io.BytesIO()
  image.save(buffer, format='PNG' if mode not in ('CMYK',) else 'JPEG')
  data = buffer.getvalue()
  rgb = transforms.decode(data, 3)
  assert rgb.mode == 'RGB'
  # torchvision's ImageFolder loader: Image.open(f).convert('RGB').
  np.testing.assert_array_equal(np.asarray(rgb), np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))
  assert transforms.to_array(transforms.decode(data, 1)).shape == (40, 50, 1)


def test_stored_size_passes_arrays_through_and_refuses_another_size():
  from cnnjax.errors import DataError
  t = transforms.StoredSize((28, 28, 1))
  pixels = np.arange(784, dtype=np.uint8).reshape(28, 28, 1)
  np.testing.assert_array_equal(t(pixels), pixels)
  np.testing.assert_array_equal(t(_jpeg(_image(28, 28).convert('L'), quality=100)).shape, (28, 28, 1))
  with pytest.raises(DataError, match='data.image_size'):
    t(np.zeros((30, 28, 1), np.uint8))


def test_option_checks_name_the_key():
  from cnnjax.errors import ConfigError
  transforms.check_options(64, transforms.SCALE, transforms.RATIO, 0.875)
  for args, key in (((-1, (0.08, 1), (0.75, 1.33), 0.875), 'image_size'),
                    ((64, (0.5, 0.1), (0.75, 1.33), 0.875), 'crop_scale'),
                    ((64, (0.08, 1), (0.0, 1.33), 0.875), 'crop_ratio'),
                    ((64, (0.08, 1), (0.75, 1.33), 1.5), 'eval_crop_fraction')):
    with pytest.raises(ConfigError, match=key):
      transforms.check_options(*args)
  assert math.isclose(transforms.eval_resize(64), 73)
