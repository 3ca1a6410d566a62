"""RandAugment and TrivialAugment against torchvision's transforms v2 on uint8 images.

Every op at every magnitude bin and sign is compared with torchvision's own kernel
(`_apply_image_or_video_transform`, nearest interpolation, black fill) on the same image:
equal pixel for pixel, except

* Color (saturation): within 1 level. torchvision's grayscale is `r*0.2989 + g*0.587 + b*0.114`
  computed with fused multiply-adds and then floored; XLA rounds each product, so a gray value
  within float32 rounding of an integer can floor one lower or higher.
* ShearX / ShearY: the same source pixel is taken except where the sample position is an exact
  tie between two pixels (x.5; shears of 0.01 k make many), which torch's fused multiply-add
  rounds one way and XLA the other: at most 0.5% of the pixels here.

The magnitude tables are torchvision's (torch's float32 linspace) value for value.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from cnnjax.data import augment, autoaugment

POLICIES = {'randaugment': 'RandAugment', 'trivialaugment': 'TrivialAugmentWide'}
SIZES = [(20, 24, 3), (16, 16, 1)]   # non-square RGB; square (exact rot90) with one channel
WITHIN_ONE_LEVEL = {'Color'}
TIES = {'ShearX', 'ShearY'}


@pytest.mark.parametrize('name', POLICIES)
@pytest.mark.parametrize('bins', [31, 10])
def test_magnitude_tables_are_torchvisions(name, bins):
  tv2 = pytest.importorskip('torchvision.transforms.v2')
  space = getattr(tv2, POLICIES[name])._AUGMENTATION_SPACE
  assert tuple(space) == autoaugment.OPS
  assert autoaugment.SIGNED == {op for op, (_, signed) in space.items() if signed}
  ours = autoaugment.magnitudes(name, bins, 20, 24)
  for op, (fn, _) in space.items():
    theirs = fn(bins, 20, 24)
    if theirs is None:
      assert op not in ours
    else:
      np.testing.assert_array_equal(ours[op], theirs.numpy(), err_msg=op)


@pytest.fixture(scope='module')
def apply_ops():
  return jax.jit(jax.vmap(autoaugment.apply_op))


@pytest.mark.parametrize('name', POLICIES)
@pytest.mark.parametrize('size', SIZES, ids=lambda s: 'x'.join(map(str, s)))
def test_every_op_at_every_magnitude_matches_torchvision(apply_ops, name, size):
  torch = pytest.importorskip('torch')
  tv2 = pytest.importorskip('torchvision.transforms.v2')
  h, w, c = size
  reference = getattr(tv2, POLICIES[name])()
  table = autoaugment.param_table(name, reference.num_magnitude_bins, h, w)
  rng = np.random.default_rng(0)
  cases, images, expected = [], [], []
  for o, op in enumerate(autoaugment.OPS):
    magnitudes_fn, signed = reference._AUGMENTATION_SPACE[op]
    magnitudes = magnitudes_fn(reference.num_magnitude_bins, h, w)
    for b in range(reference.num_magnitude_bins):
      for sign in (0, 1) if signed else (0,):
        magnitude = 0.0 if magnitudes is None else float(magnitudes[b]) * (-1 if sign else 1)
        image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        if b % 3 == 0:   # low contrast: autocontrast and equalize stretch it
          image = image // 4 + 60
        out = reference._apply_image_or_video_transform(
            torch.from_numpy(image).permute(2, 0, 1).contiguous(), op, magnitude,
            interpolation=reference.interpolation, fill=reference._fill)
        cases.append((o, b, sign))
        images.append(image)
        expected.append(out.permute(1, 2, 0).numpy())
  ops = np.array([o for o, _, _ in cases])
  params = np.stack([table[o, b, s] for o, b, s in cases])
  got = np.asarray(apply_ops(np.stack(images), ops, params)).astype(int)
  diff = np.abs(got - np.stack(expected).astype(int))
  for o, op in enumerate(autoaugment.OPS):
    d = diff[ops == o]
    if op in WITHIN_ONE_LEVEL:
      assert d.max() <= 1, op
    elif op in TIES:
      assert (d > 0).mean() <= 0.005, (op, (d > 0).mean())
    else:
      assert d.max() == 0, (op, int(d.max()), int((d > 0).sum()))
  # Not vacuous: the ops do change the images (all but Identity, at some magnitude).
  changed = {autoaugment.OPS[o] for o, g, x in zip(ops, got, images) if not np.array_equal(g, x)}
  expected_changed = set(autoaugment.OPS) - {'Identity'} - ({'Color'} if c == 1 else set())
  if h * w < 256:  # PIL's (and torchvision's) equalize leaves images of < 256 pixels alone
    expected_changed -= {'Equalize'}
  assert changed == expected_changed


@pytest.fixture(scope='module')
def augment_fn():
  return jax.jit(augment.apply, static_argnames=('crop_padding', 'pad_mode', 'flip', 'policy'))


@pytest.mark.parametrize('policy', [autoaugment.Policy('randaugment', 2, 9),
                                    autoaugment.Policy('trivialaugment')], ids=lambda p: p.name)
def test_each_image_draws_from_its_global_index(augment_fn, policy):
  """Image i's draws depend only on the key and its global index i, not on where a device's
  slice starts: the batches at first_index 0 and 8 agree on the rows they share (one image
  repeated, so any difference between rows comes from the draws, which differ)."""
  x = np.random.default_rng(1).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
  x[:] = x[0]
  key = jax.random.key(5)
  first = np.asarray(augment_fn(key, x, policy=policy))
  second = np.asarray(augment_fn(key, x, policy=policy, first_index=8))
  np.testing.assert_array_equal(first[8:], second[:8])
  assert len({out.tobytes() for out in first}) > 8


@pytest.mark.parametrize('policy', [autoaugment.Policy('randaugment', 2, 9),
                                    autoaugment.Policy('trivialaugment')], ids=lambda p: p.name)
def test_ops_are_drawn_uniformly_with_random_signs(policy):
  """14 ops with equal probability, the bin fixed (RandAugment) or uniform (TrivialAugment), a
  signed magnitude negated half the time, independently in each round."""
  keys = jax.random.split(jax.random.key(0), 7000)
  draws = jax.jit(jax.vmap(lambda k: [autoaugment.draw(k, policy, r) for r in (0, 1)]))(keys)
  (ops, bins, negative), (ops2, _, _) = [[np.asarray(a) for a in d] for d in draws]
  counts = np.bincount(ops, minlength=len(autoaugment.OPS))
  expected = len(keys) / len(autoaugment.OPS)
  assert counts.min() > 0.8 * expected and counts.max() < 1.2 * expected, counts
  if policy.name == 'randaugment':
    assert (bins == policy.magnitude).all()
  else:
    assert bins.min() == 0 and bins.max() == policy.bins - 1
    assert abs(bins.mean() - (policy.bins - 1) / 2) < 0.5
  assert abs(negative.mean() - 0.5) < 0.03
  assert (ops != ops2).mean() > 0.9   # the rounds draw independently


def test_bad_policies_are_config_errors():
  from cnnjax.errors import ConfigError
  with pytest.raises(ConfigError, match='magnitude'):
    autoaugment.Policy('randaugment', 2, 31)
  with pytest.raises(ConfigError, match='policy'):
    autoaugment.Policy('autoaugment')


def test_data_config_fields_make_the_recipe():
  """--config.data.* fields become the step's recipe fields; conflicting or malformed ones are
  config errors naming the field."""
  from cnnjax import config as config_lib
  from cnnjax.data import mixing
  from cnnjax.errors import ConfigError
  config = config_lib.load_experiment('quickstart', [
      '--config.data.randaugment=2,9', '--config.data.random_erasing=0.25',
      '--config.data.mixup_alpha=0.2', '--config.data.cutmix_alpha=1.0'])
  fields = augment.recipe_fields(config.data, num_classes=10)
  assert fields == dict(augment_policy=autoaugment.Policy('randaugment', 2, 9),
                        random_erasing=0.25, random_erasing_mode='zero',
                        mixing=mixing.MixSpec(0.2, 1.0, 1.0, 0.5, 10))
  off = augment.recipe_fields(config_lib.load_experiment('quickstart').data, num_classes=10)
  assert off == dict(augment_policy=None, random_erasing=0.0, random_erasing_mode='zero',
                     mixing=None)
  config_lib.apply_overrides(config, ['data.trivialaugment=true'])
  with pytest.raises(ConfigError, match='data.randaugment and data.trivialaugment'):
    augment.recipe_fields(config.data, 10)
  config_lib.apply_overrides(config, ['data.trivialaugment=false', 'data.randaugment=9'])
  with pytest.raises(ConfigError, match='num_ops, magnitude'):
    augment.recipe_fields(config.data, 10)
  config_lib.apply_overrides(config, ['data.randaugment=()', 'data.random_erasing_mode=noise'])
  with pytest.raises(ConfigError, match='random_erasing_mode'):
    augment.recipe_fields(config.data, 10)
