"""On-device augmentation and normalization: pure jax functions to call inside the jit step.

Images stay uint8 NHWC through augmentation (a quarter of float32's memory and transfer) and
become float32 only in `normalize`. Every random choice is per image and comes from an explicit
`rng` key folded with the image's index in the global batch, so the same key gives the same batch
however it is split over devices (`first_index` says where a device's slice starts).

The recipes match torchvision's: `random_crop(padding=4)` is `transforms.RandomCrop(32,
padding=4)` (zero padding, i.e. black in uint8, or `padding_mode='reflect'`), `random_flip` is
`RandomHorizontalFlip()`, `normalize` is `ToTensor()` followed by `Normalize(mean / 255,
std / 255)`, and `random_erasing` is `RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3),
value=0)` after `Normalize` (torchvision's default value; mode 'pixel' is timm's per-pixel
N(0, 1) instead). RandAugment / TrivialAugmentWide (`cnnjax.data.autoaugment`) run after the
crop and flip, on uint8, on in-memory and streamed batches alike (a streamed batch arrives
random-resized-cropped and flipped by the host). A zero-padded random crop is a random
translation by up to +-padding pixels with the vacated border filled with black.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

import ml_collections

from cnnjax.data import autoaugment, mixing
from cnnjax.errors import ConfigError

PAD_MODES = ('constant', 'reflect')
ERASING_MODES = ('zero', 'pixel')
ERASING_SCALE = (0.02, 0.33)     # torchvision's RandomErasing defaults
ERASING_RATIO = (0.3, 3.3)
ERASING_TRIES = 10
AUTOAUGMENT_STREAM, ERASING_STREAM = 1, 2   # fold_in constants: independent of crop and flip


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """(images - mean) / std in float32, with per-channel `mean` and `std` in [0, 255] units."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def per_image_keys(rng: jax.Array, count: int, first_index=0) -> jax.Array:
  """One key per image: `rng` folded with the image's index in the global batch."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(first_index + jnp.arange(count))


def random_crop(rng: jax.Array, images: jax.Array, padding: int,
                mode: str = 'constant', first_index=0) -> jax.Array:
  """Pads each image by `padding` pixels on every side, then crops back a random window.

  Args:
    rng: a jax PRNG key.
    images: (N, H, W, C), any dtype.
    padding: pixels added on each side (static); 0 returns `images` unchanged.
    mode: 'constant' (zeros) or 'reflect' (mirror without repeating the edge, as
      torch's 'reflect'; needs padding < H and < W).
    first_index: the index of `images[0]` in the global batch (non-zero on all devices but the
      first under pmap).

  Returns:
    (N, H, W, C) of the same dtype; each image's window offset is drawn uniformly from
    {0, ..., 2 * padding} in each axis, independently per image.
  """
  if mode not in PAD_MODES:
    raise ConfigError(f'Unknown padding mode {mode!r}; use one of {PAD_MODES}.')
  if not isinstance(padding, int) or padding < 0:
    raise ConfigError(f'Crop padding must be a non-negative int, got {padding!r}.')
  if padding == 0:
    return images
  n, h, w, c = images.shape
  if mode == 'reflect' and (padding >= h or padding >= w):
    raise ConfigError(f'Reflect padding {padding} needs images larger than it, got {h}x{w}.')
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
  keys = per_image_keys(rng, n, first_index)
  offsets = jax.vmap(lambda key: jax.random.randint(key, (2,), 0, 2 * padding + 1))(keys)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, images: jax.Array, first_index=0) -> jax.Array:
  """Mirrors each image left-right with probability 0.5, independently per image."""
  keys = per_image_keys(rng, images.shape[0], first_index)
  flip = jax.vmap(lambda key: jax.random.bernoulli(key, 0.5))(keys)
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def recipe_fields(data_config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """The StepRecipe fields of the data.* augmentation settings, checked (ConfigError)."""
  policy = None
  if data_config.randaugment and data_config.trivialaugment:
    raise ConfigError('data.randaugment and data.trivialaugment are two policies; set one.')
  if data_config.randaugment:
    if len(data_config.randaugment) != 2:
      raise ConfigError(f'data.randaugment is (num_ops, magnitude), e.g. 2,9; got '
                        f'{data_config.randaugment}.')
    num_ops, magnitude = (int(v) for v in data_config.randaugment)
    policy = autoaugment.Policy('randaugment', num_ops, magnitude)
  elif data_config.trivialaugment:
    policy = autoaugment.Policy('trivialaugment')
  check_erasing(data_config.random_erasing, data_config.random_erasing_mode)
  spec = mixing.MixSpec(data_config.mixup_alpha, data_config.cutmix_alpha, data_config.mix_prob,
                        data_config.mix_switch_prob, num_classes)
  return dict(augment_policy=policy, random_erasing=data_config.random_erasing,
              random_erasing_mode=data_config.random_erasing_mode,
              mixing=spec if spec.active else None)


def check_erasing(prob: float, mode: str) -> None:
  if mode not in ERASING_MODES:
    raise ConfigError(f'Unknown data.random_erasing_mode {mode!r}; use one of {ERASING_MODES}.')
  if not 0.0 <= prob <= 1.0:
    raise ConfigError(f'data.random_erasing is a probability in [0, 1], got {prob}.')


def erasing_box(draws: jax.Array, height: int, width: int) -> tuple[jax.Array, ...]:
  """torchvision's `RandomErasing.make_params` from uniform [0, 1) draws of shape (4, 10): per try
  the area fraction, the log aspect ratio, the top and the left. Returns (top, left, h, w,
  found); `found` is False when none of the 10 tries fits (torchvision then erases nothing)."""
  u_scale, u_ratio, u_top, u_left = draws
  low, high = ERASING_SCALE
  log_low, log_high = jnp.log(jnp.asarray(ERASING_RATIO, jnp.float32))
  erase_area = (height * width) * (low + u_scale * (high - low))
  aspect = jnp.exp(log_low + u_ratio * (log_high - log_low))
  h = jnp.round(jnp.sqrt(erase_area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(erase_area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits)
  h, w = h[first], w[first]
  top = jnp.floor(u_top[first] * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(u_left[first] * (width - w + 1)).astype(jnp.int32)
  return top, left, h, w, jnp.any(fits)


def random_erasing(rng: jax.Array, images: jax.Array, prob: float, mode: str = 'zero',
                   first_index=0) -> jax.Array:
  """Erases one random rectangle of each normalized image with probability `prob`.

  mode 'zero' fills it with 0 (torchvision's default `value=0`: the mean colour after
  normalization); 'pixel' with values drawn from N(0, 1) per pixel and channel (timm's
  mode='pixel'). `prob` 0 returns `images` unchanged.
  """
  check_erasing(prob, mode)
  if prob == 0:
    return images
  n, height, width, channels = images.shape

  def erase(key, image):
    k_apply, k_box, k_value = jax.random.split(key, 3)
    top, left, h, w, found = erasing_box(jax.random.uniform(k_box, (4, ERASING_TRIES)),
                                         height, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    inside &= found & (jax.random.uniform(k_apply) < prob)
    value = (jax.random.normal(k_value, image.shape, image.dtype) if mode == 'pixel'
             else jnp.zeros((), image.dtype))
    return jnp.where(inside[:, :, None], value, image)

  return jax.vmap(erase)(per_image_keys(rng, n, first_index), images)


def apply(rng: jax.Array, images: jax.Array, crop_padding: int = 0,
          pad_mode: str = 'constant', flip: bool = False,
          policy: autoaugment.Policy | None = None, first_index=0) -> jax.Array:
  """The training augmentation of an experiment on uint8 images: random crop (if
  crop_padding > 0), then flip, then RandAugment / TrivialAugment (`policy`), as torchvision's
  recipes order them. Random erasing comes after `normalize` (`random_erasing`).

  All arguments but `rng`, `images` and `first_index` are static (python values from the
  config), so `jax.jit(functools.partial(apply, crop_padding=4, flip=True))` compiles once.
  """
  crop_rng, flip_rng = jax.random.split(rng)
  images = random_crop(crop_rng, images, crop_padding, pad_mode, first_index)
  if flip:
    images = random_flip(flip_rng, images, first_index)
  if policy is not None:
    keys = per_image_keys(jax.random.fold_in(rng, AUTOAUGMENT_STREAM), images.shape[0],
                          first_index)
    images = autoaugment.apply(keys, images, policy)
  return images
