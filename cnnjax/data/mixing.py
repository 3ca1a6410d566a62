"""Mixup and CutMix on the device, as timm's `Mixup` in its default 'batch' mode.

Per step one draw decides for the whole (global) batch: with probability `prob` the batch is
mixed at all; if both alphas are > 0, CutMix is chosen with probability `switch_prob`, else
Mixup; lambda ~ Beta(alpha, alpha) of the chosen one. Each image is mixed with its partner in
the batch flipped end to end (image i with image N-1-i of the global batch):

* Mixup (Zhang et al. 2018): `lam * x + (1 - lam) * x[::-1]`.
* CutMix (Yun et al. 2019): a box of `int(H * sqrt(1 - lam))` x `int(W * sqrt(1 - lam))`
  pixels centred on a uniform random pixel, clipped to the image, is pasted from the partner;
  lambda becomes the kept area, `1 - box area / (H * W)` (timm's `rand_bbox`,
  `correct_lam=True`).

The targets are timm's `mixup_target`: one-hot labels smoothed to `1 - s + s / K` and `s / K`,
then `lam * y + (1 - lam) * y[::-1]`. Mixing happens after normalization (and random erasing),
as on timm's and torchvision's collated batches. The draws come from a key shared by every
device, and under pmap the partner slice is fetched from the mirror device, so pmap, jit and
one device mix a global batch identically.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from cnnjax.errors import ConfigError

STREAM = 3   # fold_in constant of the step's augmentation key for the mixing draws


@dataclasses.dataclass(frozen=True)
class MixSpec:
  """timm's `Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode='batch')`."""
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0           # probability that a batch is mixed at all
  switch_prob: float = 0.5    # probability of CutMix instead of Mixup when both are on
  num_classes: int = 0        # of the targets (the model's outputs)

  def __post_init__(self):
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      raise ConfigError(f'data.mixup_alpha and data.cutmix_alpha must be >= 0, got '
                        f'{self.mixup_alpha} and {self.cutmix_alpha}.')
    for name, p in (('data.mix_prob', self.prob), ('data.mix_switch_prob', self.switch_prob)):
      if not 0.0 <= p <= 1.0:
        raise ConfigError(f'{name} must be a probability in [0, 1], got {p}.')

  @property
  def active(self) -> bool:
    return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


Mix = dict  # one batch's draws: lam (before CutMix's correction), use_cutmix, box centre cy, cx


def draw(rng: jax.Array, spec: MixSpec, height: int, width: int) -> Mix:
  """The random choices of one batch (timm's `_params_per_batch` and `rand_bbox` centre)."""
  k_prob, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(rng, 6)
  applied = jax.random.uniform(k_prob) < spec.prob
  if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < spec.switch_prob
  else:
    use_cutmix = jnp.asarray(spec.cutmix_alpha > 0)
  lam = jnp.ones((), jnp.float32)
  if spec.mixup_alpha > 0:
    lam = jax.random.beta(k_mixup, spec.mixup_alpha, spec.mixup_alpha)
  if spec.cutmix_alpha > 0:
    lam = jnp.where(use_cutmix, jax.random.beta(k_cutmix, spec.cutmix_alpha, spec.cutmix_alpha),
                    lam)
  return Mix(lam=jnp.where(applied, lam, 1.0).astype(jnp.float32),
             use_cutmix=use_cutmix & applied,
             cy=jax.random.randint(k_y, (), 0, height), cx=jax.random.randint(k_x, (), 0, width))


def cutmix_box(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int):
  """timm's `rand_bbox` (margin 0) for a given centre: (top, bottom, left, right), clipped."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  return top, bottom, left, right


def mirror(x: jax.Array, axis_name: str | None = None) -> jax.Array:
  """The global batch flipped end to end; under pmap each device gets its mirror's slice."""
  flipped = x[::-1]
  if axis_name is None:
    return flipped
  n = jax.lax.axis_size(axis_name)
  return jax.lax.ppermute(flipped, axis_name, [(d, n - 1 - d) for d in range(n)])


def mix_images(images: jax.Array, partner: jax.Array, mix: Mix) -> tuple[jax.Array, jax.Array]:
  """(mixed images, lam of the targets) for draws `mix`; lam is the kept area under CutMix."""
  height, width = images.shape[1:3]
  top, bottom, left, right = cutmix_box(mix['lam'], mix['cy'], mix['cx'], height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  cut = jnp.where(inside[None, :, :, None], partner, images)
  lam = mix['lam'].astype(images.dtype)
  blended = images * lam + partner * (1.0 - lam)
  kept = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
  use_cutmix = mix['use_cutmix']
  return (jnp.where(use_cutmix, cut, blended),
          jnp.where(use_cutmix, kept, mix['lam']).astype(jnp.float32))


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's `one_hot(on=1 - s + s / K, off=s / K)` (optax.smooth_labels of a one-hot)."""
  targets = jax.nn.one_hot(labels, num_classes)
  return optax.smooth_labels(targets, smoothing) if smoothing else targets


def mix_targets(labels: jax.Array, partner_labels: jax.Array, lam: jax.Array, num_classes: int,
                smoothing: float = 0.0) -> jax.Array:
  """timm's `mixup_target`: smoothed one-hots of the labels and of their partners, mixed."""
  return (smoothed_one_hot(labels, num_classes, smoothing) * lam
          + smoothed_one_hot(partner_labels, num_classes, smoothing) * (1.0 - lam))


def apply(rng: jax.Array, images: jax.Array, labels: jax.Array, spec: MixSpec,
          label_smoothing: float = 0.0,
          axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Mixes a (normalized, float) batch: (mixed images, soft targets (N, num_classes)).

  `rng` must be the same on every device (the draws are per global batch)."""
  mix = draw(rng, spec, *images.shape[1:3])
  images, lam = mix_images(images, mirror(images, axis_name), mix)
  return images, mix_targets(labels, mirror(labels, axis_name), lam, spec.num_classes,
                             label_smoothing)
