"""Host-side image transforms for streamed data: decode, then ImageNet-style crop and resize.

These run in the loader's worker processes on one image at a time (PIL, uint8 HWC out), so
they never import JAX. They are torchvision's transforms, pixel for pixel on the same crop:

* train (`TrainTransform`): `RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`
  (`crop_box` is torchvision's sampling algorithm, 10 tries then a central fallback) with
  bilinear, antialiased resizing, then `RandomHorizontalFlip()`;
* eval (`EvalTransform`): `Resize(int(size / crop_fraction))` (the short side; 256 for 224),
  then `CenterCrop(size)`.

Images of any mode are converted to the dataset's channels as torchvision's `ImageFolder`
loader does (`convert('RGB')`: grayscale, palette, CMYK and RGBA all become RGB; alpha is
dropped), or to 'L' for a one-channel dataset. Normalization happens later, on the device.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings
from typing import Callable

import numpy as np
from PIL import Image

from cnnjax.errors import ConfigError, DataError

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_FRACTION = 0.875   # eval: resize the short side to size / 0.875, center-crop size


def decode(data, channels: int) -> Image.Image:
  """A PIL image in mode 'RGB' (channels 3) or 'L' (channels 1) from encoded bytes or uint8
  HWC / HW pixels. Raises PIL's errors (`OSError`, `Image.DecompressionBombError`, ...) on a
  corrupt or unreadable file; the loader turns them into one sentence naming the file."""
  if isinstance(data, np.ndarray):
    image = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
  else:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated file fails here, inside the caller's error handling
  mode = 'L' if channels == 1 else 'RGB'
  if image.mode != mode:
    with warnings.catch_warnings():  # "Palette images with Transparency ...": we drop alpha
      warnings.simplefilter('ignore', UserWarning)
      image = image.convert(mode)
  return image


def to_array(image: Image.Image) -> np.ndarray:
  """uint8 (H, W, C) pixels of a PIL image in mode 'RGB' or 'L'."""
  pixels = np.asarray(image, dtype=np.uint8)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             uniform: Callable[[float, float], float],
             integers: Callable[[int, int], int]) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) of a random-resized crop: torchvision's
  `RandomResizedCrop.get_params`, drawing from `uniform(low, high)` and `integers(low,
  high_exclusive)` (a `numpy.random.Generator`'s methods in the loader)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * uniform(scale[0], scale[1])
    aspect = math.exp(uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(integers(0, height - h + 1)), int(integers(0, width - w + 1)), h, w
  in_ratio = width / height  # fallback: the largest central crop within the aspect range
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
  """The crop `box` = (top, left, height, width) resized to size x size (bilinear, antialiased
  as PIL always is): torchvision's `resized_crop` on a PIL image."""
  top, left, h, w = box
  return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
  """torchvision's `Resize(short)`: the short side becomes `short`, the long side
  int(short * long / short_before)."""
  width, height = image.size
  if width <= height:
    new_w, new_h = short, int(short * height / width)
  else:
    new_w, new_h = int(short * width / height), short
  if (new_w, new_h) == (width, height):
    return image
  return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision's `CenterCrop(size)` of an image at least `size` on each side."""
  width, height = image.size
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def eval_resize(size: int, crop_fraction: float = CROP_FRACTION) -> int:
  """The short side eval images are resized to before the center crop (256 for 224)."""
  return max(size, int(size / crop_fraction))


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Decoded, random-resized-cropped and (maybe) mirrored uint8 (size, size, channels)."""
  size: int
  channels: int
  scale: tuple[float, float] = SCALE
  ratio: tuple[float, float] = RATIO
  flip: bool = True

  def __call__(self, data, rng: np.random.Generator) -> np.ndarray:
    image = decode(data, self.channels)
    box = crop_box(image.height, image.width, self.scale, self.ratio, rng.uniform, rng.integers)
    image = resized_crop(image, box, self.size)
    if self.flip and rng.uniform(0.0, 1.0) < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return to_array(image)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Decoded, short side resized to size / crop_fraction, center-cropped to size x size."""
  size: int
  channels: int
  crop_fraction: float = CROP_FRACTION

  def __call__(self, data, rng: np.random.Generator | None = None) -> np.ndarray:
    del rng  # deterministic
    image = resize_short_side(decode(data, self.channels), eval_resize(self.size,
                                                                       self.crop_fraction))
    return to_array(center_crop(image, self.size))


@dataclasses.dataclass(frozen=True)
class StoredSize:
  """Images used at their stored size (`data.image_size=0`): decoded, and checked to be
  `shape` (the first image's) so every batch stacks; augmentation then happens on the device."""
  shape: tuple[int, int, int]

  def __call__(self, data, rng: np.random.Generator | None = None) -> np.ndarray:
    del rng
    pixels = data if isinstance(data, np.ndarray) else to_array(decode(data, self.shape[-1]))
    if pixels.ndim == 2:
      pixels = pixels[..., None]
    if tuple(pixels.shape) != tuple(self.shape):
      raise DataError(f'images must share one size to be used as stored, but one is '
                      f'{pixels.shape[1]}x{pixels.shape[0]} and the first is '
                      f'{self.shape[1]}x{self.shape[0]} (width x height); set data.image_size '
                      f'to crop and resize every image to one size.')
    return pixels


def check_options(size: int, scale, ratio, crop_fraction: float) -> None:
  """Raises ConfigError naming the `data.*` key of a transform setting out of range."""
  if size < 0:
    raise ConfigError(f'data.image_size must be >= 0, got {size}.')
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise ConfigError(f'data.crop_scale must be (low, high) with 0 < low <= high <= 1, got '
                      f'{tuple(scale)}.')
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ConfigError(f'data.crop_ratio must be (low, high) with 0 < low <= high, got '
                      f'{tuple(ratio)}.')
  if not 0 < crop_fraction <= 1:
    raise ConfigError(f'data.eval_crop_fraction must lie in (0, 1], got {crop_fraction}.')
