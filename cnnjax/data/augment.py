"""On-device augmentation and normalization: pure jax functions to call inside the jit step.

Images stay uint8 NHWC through augmentation (a quarter of float32's memory and transfer) and
become float32 only in `normalize`. Every random choice is per image and comes from an explicit
`rng` key folded with the image's index in the global batch, so the same key gives the same batch
however it is split over devices (`first_index` says where a device's slice starts). The recipes match torchvision's:
`random_crop(padding=4)` is `transforms.RandomCrop(32, padding=4)` (zero padding, i.e. black in
uint8, or `padding_mode='reflect'`), `random_flip` is `RandomHorizontalFlip()`, and `normalize`
is `ToTensor()` followed by `Normalize(mean / 255, std / 255)`. A zero-padded random crop is a
random translation by up to +-padding pixels with the vacated border filled with black.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from cnnjax.errors import ConfigError

PAD_MODES = ('constant', 'reflect')


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


def apply(rng: jax.Array, images: jax.Array, crop_padding: int = 0,
          pad_mode: str = 'constant', flip: bool = False, first_index=0) -> jax.Array:
  """The training augmentation of an experiment: random crop (if crop_padding > 0), then flip.

  All arguments but `rng`, `images` and `first_index` are static (python values from the
  config), so `jax.jit(functools.partial(apply, crop_padding=4, flip=True))` compiles once.
  """
  crop_rng, flip_rng = jax.random.split(rng)
  images = random_crop(crop_rng, images, crop_padding, pad_mode, first_index)
  if flip:
    images = random_flip(flip_rng, images, first_index)
  return images
