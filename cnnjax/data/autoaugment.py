"""RandAugment and TrivialAugment on the device, as torchvision's transforms v2.

`RandAugment(num_ops, magnitude, num_magnitude_bins=31)` (Cubuk et al. 2020) applies `num_ops`
operations in a row, each chosen uniformly from the 14 below at the fixed magnitude bin;
`TrivialAugmentWide(num_magnitude_bins=31)` (Mueller & Hutter 2021) applies one, with a uniform
bin. A signed magnitude is negated with probability 0.5. The ops and magnitude ranges are
torchvision's `_AUGMENTATION_SPACE`s, with its defaults: nearest interpolation, black fill.

Each op is torchvision's tensor kernel on uint8 pixels, rewritten in jax: shear, translate and
rotate are one inverse-affine warp (`_get_inverse_affine_matrix`, `_affine_grid`, nearest
`grid_sample`, zeros outside); brightness, color (saturation), contrast and sharpness blend the
image with black, its grayscale, its mean gray or its 3x3-smoothed self and truncate to uint8;
posterize, solarize, autocontrast and equalize (PIL's lookup table, as torchvision's) are
pixel maps. Magnitudes are tabulated on the host per (op, bin, sign) with torch's float32
`linspace`, so the device only looks up its parameters. Every random choice is per image, from
the image's own key (`augment.per_image_keys`: its index in the global batch).

Under `vmap` the `lax.switch` over ops computes every branch for every image and keeps one;
the five geometric ops share one branch (one gather per image) to keep that cheap.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.errors import ConfigError

OPS = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness',
       'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize', 'AutoContrast', 'Equalize')
SIGNED = frozenset(('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness',
                    'Color', 'Contrast', 'Sharpness'))
GEOMETRIC = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
NUM_PARAMS = 6   # per (op, bin, sign): an inverse affine matrix, or (ratio, 1 - ratio), or one int


@dataclasses.dataclass(frozen=True)
class Policy:
  """'randaugment' (num_ops ops at bin `magnitude`) or 'trivialaugment' (one op, random bin)."""
  name: str
  num_ops: int = 2
  magnitude: int = 9
  bins: int = 31

  def __post_init__(self):
    if self.name not in ('randaugment', 'trivialaugment'):
      raise ConfigError(f"Unknown augmentation policy {self.name!r}; use 'randaugment' or "
                        "'trivialaugment'.")
    if self.bins < 2 or self.num_ops < 0 or not 0 <= self.magnitude < self.bins:
      raise ConfigError(f'RandAugment needs num_ops >= 0 and 0 <= magnitude < {self.bins} '
                        f'(its magnitude bins), got num_ops {self.num_ops}, magnitude '
                        f'{self.magnitude}.')


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace in float32, value for value (both halves, fused multiply-add)."""
  f = np.float32
  start, end = f(start), f(end)
  step = f((end - start) / f(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  low = (np.float64(start) + np.float64(step) * i).astype(f)
  high = (np.float64(end) - np.float64(step) * (steps - 1 - i)).astype(f)
  return np.where(np.arange(steps) < steps // 2, low, high)


def magnitudes(name: str, bins: int, height: int, width: int) -> dict[str, np.ndarray]:
  """Each op's magnitude per bin (float32, unsigned): torchvision's `_AUGMENTATION_SPACE`."""
  wide = name == 'trivialaugment'
  shear, brightness = (0.99, 0.99) if wide else (0.3, 0.9)
  bits = (8 - np.arange(bins, dtype=np.float32) / np.float32((bins - 1) / (6 if wide else 4)))
  return {
      'ShearX': torch_linspace(0.0, shear, bins), 'ShearY': torch_linspace(0.0, shear, bins),
      'TranslateX': torch_linspace(0.0, 32.0 if wide else 150.0 / 331.0 * width, bins),
      'TranslateY': torch_linspace(0.0, 32.0 if wide else 150.0 / 331.0 * height, bins),
      'Rotate': torch_linspace(0.0, 135.0 if wide else 30.0, bins),
      **{op: torch_linspace(0.0, brightness, bins)
         for op in ('Brightness', 'Color', 'Contrast', 'Sharpness')},
      'Posterize': np.round(bits).astype(np.int32),
      'Solarize': torch_linspace(1.0, 0.0, bins),
  }


def inverse_affine(center, angle, translate, shear) -> list[float]:
  """torchvision's `_get_inverse_affine_matrix` (scale 1), in float64."""
  rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
  cx, cy = center
  tx, ty = translate
  a = math.cos(rot - sy) / math.cos(sy)
  b = -(a * math.tan(sx) + math.sin(rot))
  c = math.sin(rot - sy) / math.cos(sy)
  d = math.cos(rot) - c * math.tan(sx)
  if angle % 90 == 0 and shear == (0.0, 0.0):   # rot90 / rot180: torchvision's exact fast path
    a, b, c, d = (round(v) for v in (a, b, c, d))
  m = [d, -b, 0.0, -c, a, 0.0]
  m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
  m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
  return m


def op_params(name: str, op: str, magnitude: float, height: int, width: int) -> list[float]:
  """The parameters of one op at one signed magnitude, as torchvision computes them."""
  corner = [-0.5 * width, -0.5 * height]   # center=[0, 0] of torchvision's shears: the corner
  if op == 'ShearX':
    return inverse_affine(corner, 0.0, (0.0, 0.0), (math.degrees(math.atan(magnitude)), 0.0))
  if op == 'ShearY':
    return inverse_affine(corner, 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(magnitude))))
  if op == 'TranslateX':
    return inverse_affine([0.0, 0.0], 0.0, (float(int(magnitude)), 0.0), (0.0, 0.0))
  if op == 'TranslateY':
    return inverse_affine([0.0, 0.0], 0.0, (0.0, float(int(magnitude))), (0.0, 0.0))
  if op == 'Rotate':
    return inverse_affine([0.0, 0.0], -(magnitude % 360), (0.0, 0.0), (0.0, 0.0))
  if op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
    ratio = 1.0 + magnitude
    return [ratio, 1.0 - ratio, 0, 0, 0, 0]
  if op == 'Posterize':
    bits = int(magnitude)
    return [((1 << bits) - 1) << (8 - bits) if bits < 8 else 255, 0, 0, 0, 0, 0]
  if op == 'Solarize':   # uint8 pixel >= 255 * magnitude  <=>  pixel >= ceil(255 * magnitude)
    return [math.ceil(np.float32(255.0 * float(magnitude))), 0, 0, 0, 0, 0]
  return [0.0] * NUM_PARAMS


@functools.lru_cache(maxsize=None)
def param_table(name: str, bins: int, height: int, width: int) -> np.ndarray:
  """(ops, bins, 2 signs, NUM_PARAMS) float32: index [op, bin, 1] holds the negated magnitude."""
  mags = magnitudes(name, bins, height, width)
  table = np.zeros((len(OPS), bins, 2, NUM_PARAMS), np.float32)
  for o, op in enumerate(OPS):
    for b in range(bins):
      for s in (0, 1):
        m = float(mags[op][b]) if op in mags else 0.0
        params = op_params(name, op, -m if s and op in SIGNED else m, height, width)
        if op in GEOMETRIC:   # _affine_grid's theta / [0.5 w, 0.5 h], divided in float32 here
          theta = np.float32(params)
          params = np.concatenate([theta[:3] / np.float32(0.5 * width),
                                   theta[3:] / np.float32(0.5 * height)])
        table[o, b, s] = params
  return table


def _warp(image, p):
  """torchvision's affine_image: nearest grid_sample of the inverse-affine grid, zeros outside."""
  h, w, _ = image.shape
  x = jnp.arange(w, dtype=jnp.float32) - (w - 1) * 0.5
  y = (jnp.arange(h, dtype=jnp.float32) - (h - 1) * 0.5)[:, None]
  gx = x * p[0] + y * p[1] + p[2]   # p: theta rows over (0.5 w, 0.5 h), see param_table
  gy = x * p[3] + y * p[4] + p[5]
  ix = jnp.round((gx + 1) * (w / 2) - 0.5).astype(jnp.int32)   # ATen's unnormalize; nearbyint
  iy = jnp.round((gy + 1) * (h / 2) - 0.5).astype(jnp.int32)
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  pixels = image[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
  return jnp.where(inside[..., None], pixels, 0).astype(image.dtype)


def _blend(image, other, p):
  """torchvision's _blend for uint8: image * ratio + other * (1 - ratio), clamped, truncated."""
  out = image.astype(jnp.float32) * p[0] + other * p[1]
  return jnp.clip(out, 0, 255).astype(jnp.uint8)


def _gray(image):
  """rgb_to_grayscale in float32, floored (as the color kernels use it); 1 channel: itself."""
  x = image.astype(jnp.float32)
  if image.shape[-1] == 1:
    return x
  return jnp.floor(x[..., 0] * 0.2989 + x[..., 1] * 0.587 + x[..., 2] * 0.114)[..., None]


def _brightness(image, p):
  return _blend(image, jnp.zeros((), jnp.float32), p)


def _color(image, p):
  return image if image.shape[-1] == 1 else _blend(image, _gray(image), p)


def _contrast(image, p):
  return _blend(image, jnp.mean(_gray(image)), p)


def _sharpness(image, p):
  """Blend with the 3x3 smoothing [[1,1,1],[1,5,1],[1,1,1]]/13 (rounded); borders kept.

  The smoothing is exact in integers: its value S / 13 (S an integer) is never within 1/26 of
  a tie, so rounding torch's float32 convolution equals (2 S + 13) // 26."""
  h, w, _ = image.shape
  if h <= 2 or w <= 2:
    return image
  x = image.astype(jnp.int32)
  total = sum(x[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
  center = x[1:-1, 1:-1]
  blurred = (2 * (total + 4 * center) + 13) // 26
  center = center.astype(jnp.float32)
  inner = center + (blurred.astype(jnp.float32) - center) * p[1]
  inner = jnp.pad(jnp.clip(inner, 0, 255).astype(jnp.uint8), ((1, 1), (1, 1), (0, 0)))
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
  return jnp.where(border[..., None], image, inner)


def _posterize(image, p):
  return image & p[0].astype(jnp.uint8)


def _solarize(image, p):
  return jnp.where(image.astype(jnp.float32) >= p[0], 255 - image, image)


def _autocontrast(image, p):
  x = image.astype(jnp.float32)
  low = jnp.min(x, axis=(0, 1))
  high = jnp.max(x, axis=(0, 1))
  flat = high == low
  inv_scale = jnp.where(flat, 1.0, (high - low) * np.float32(1 / 255))
  low = jnp.where(flat, 0.0, low)
  # A true division, as torch's: behind the barrier XLA cannot turn x / broadcast(s) into
  # x * broadcast(1 / s), which rounds differently.
  inv_scale = jax.lax.optimization_barrier(jnp.broadcast_to(inv_scale, x.shape))
  return jnp.clip((x - low) / inv_scale, 0, 255).astype(jnp.uint8)


def _equalize_channel(channel):
  """torchvision's equalize_image (PIL's lookup table) for one uint8 (H, W) channel."""
  flat = channel.reshape(-1).astype(jnp.int32)
  hist = jnp.zeros(256, jnp.int32).at[flat].add(1)
  cum = jnp.cumsum(hist)
  step = (flat.size - hist[jnp.argmax(cum)]) // 255
  lut = jnp.clip((cum[:-1] + step // 2) // jnp.maximum(step, 1), 0, 255)
  lut = jnp.concatenate([jnp.zeros(1, jnp.int32), lut]).astype(jnp.uint8)
  return jnp.where(step != 0, lut[flat].reshape(channel.shape), channel)


def _equalize(image, p):
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)


_BRANCHES = {'Identity': lambda image, p: image, 'Warp': _warp, 'Brightness': _brightness,
             'Color': _color, 'Contrast': _contrast, 'Sharpness': _sharpness,
             'Posterize': _posterize, 'Solarize': _solarize, 'AutoContrast': _autocontrast,
             'Equalize': _equalize}
_BRANCH_NAMES = tuple(_BRANCHES)
_BRANCH_OF_OP = np.array([_BRANCH_NAMES.index('Warp' if op in GEOMETRIC else op) for op in OPS])


def apply_op(image: jax.Array, op: jax.Array, params: jax.Array) -> jax.Array:
  """Op number `op` (an index into OPS) on one uint8 (H, W, C) image with its parameters."""
  branches = [_BRANCHES[name] for name in _BRANCH_NAMES]
  return jax.lax.switch(jnp.asarray(_BRANCH_OF_OP)[op], branches, image, params)


def draw(key: jax.Array, policy: Policy, round_: int = 0) -> tuple[jax.Array, ...]:
  """One op's random choices: (op index, magnitude bin, negated?), as torchvision draws them:
  the op uniformly, the bin fixed (RandAugment) or uniform (TrivialAugment), a signed magnitude
  negated when `torch.rand(()) <= 0.5`."""
  k_op, k_bin, k_sign = jax.random.split(jax.random.fold_in(key, round_), 3)
  op = jax.random.randint(k_op, (), 0, len(OPS))
  if policy.name == 'randaugment':
    level = jnp.asarray(policy.magnitude)
  else:
    level = jax.random.randint(k_bin, (), 0, policy.bins)
  return op, level, (jax.random.uniform(k_sign) <= 0.5).astype(jnp.int32)


def augment_image(key: jax.Array, image: jax.Array, policy: Policy) -> jax.Array:
  """One image through the policy, with its own key."""
  table = jnp.asarray(param_table(policy.name, policy.bins, *image.shape[:2]))
  for round_ in range(policy.num_ops if policy.name == 'randaugment' else 1):
    op, level, negative = draw(key, policy, round_)
    image = apply_op(image, op, table[op, level, negative])
  return image


def apply(keys: jax.Array, images: jax.Array, policy: Policy) -> jax.Array:
  """Each uint8 (N, H, W, C) image (1 or 3 channels) through `policy` with its key of `keys`."""
  if images.shape[-1] not in (1, 3):
    raise ConfigError(f'RandAugment and TrivialAugment need 1- or 3-channel images, got '
                      f'{images.shape[-1]} channels.')
  return jax.vmap(functools.partial(augment_image, policy=policy))(keys, images)
