"""The in-memory dataset every source returns: uint8 NHWC images, int32 labels, channel stats.

Every source (mnist5k, tfds, npz, folder) ends in `Dataset.from_arrays`, so the checks on
dtypes, shapes and label ranges live in one place and every user-caused problem raises
`DataError` with one sentence that names the dataset (for user data: its path).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import numpy as np

from cnnjax.errors import DataError  # noqa: F401  (re-exported: raised here)



def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...],
                                                                 tuple[float, ...]]:
  """Per-channel mean and (population) std of uint8 NHWC images, in [0, 255] units.

  Accumulates in float64 over chunks of images, so a 50,000-image CIFAR split needs no
  float copy of the whole array.
  """
  channels = images.shape[-1]
  total = np.zeros(channels, np.float64)
  total_sq = np.zeros(channels, np.float64)
  for start in range(0, images.shape[0], chunk):
    block = images[start:start + chunk].reshape(-1, channels).astype(np.float64)
    total += block.sum(axis=0)
    total_sq += np.square(block).sum(axis=0)
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  var = np.maximum(total_sq / count - np.square(mean), 0.0)
  return tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(var))


def _check_images(name: str, split: str, x: np.ndarray) -> np.ndarray:
  """Returns `x` as uint8 NHWC; grayscale (N, H, W) gets a channel axis."""
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise DataError(f'{name}: x_{split} must have shape (N, H, W, C) or (N, H, W), '
                    f'got shape {x.shape}.')
  if x.shape[0] == 0:
    raise DataError(f'{name}: x_{split} holds no images.')
  if x.dtype != np.uint8:
    if not np.issubdtype(x.dtype, np.integer):
      raise DataError(f'{name}: x_{split} must hold uint8 pixels in [0, 255], got dtype '
                      f'{x.dtype} (scale floats with (x * 255).round().astype(np.uint8)).')
    if x.min() < 0 or x.max() > 255:
      raise DataError(f'{name}: x_{split} has pixel values outside [0, 255] '
                      f'(min {x.min()}, max {x.max()}).')
    x = x.astype(np.uint8)
  return x


def _check_labels(name: str, split: str, y: np.ndarray, n: int) -> np.ndarray:
  """Returns `y` as int32 (N,); an (N, 1) column (as Keras ships CIFAR) is flattened."""
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise DataError(f'{name}: y_{split} must be a vector of integer class labels, got shape '
                    f'{y.shape}.')
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f'{name}: y_{split} must hold integer class labels, got dtype {y.dtype}.')
  if y.shape[0] != n:
    raise DataError(f'{name}: y_{split} has {y.shape[0]} labels but x_{split} has {n} images.')
  if y.min() < 0:
    raise DataError(f'{name}: y_{split} has a negative label ({y.min()}).')
  return y.astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Train and test splits held in host memory.

  Attributes:
    name: what `load_dataset` was called with (plus a class selection, if any).
    x_train, x_test: uint8 images, shape (N, H, W, C).
    y_train, y_test: int32 labels in [0, num_classes), shape (N,).
    num_classes: the number of classes.
    mean, std: per-channel mean and std of `x_train` in [0, 255] units (for
      `augment.normalize`).
    class_names: one name per class when the source has them, else empty.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...] = ()

  @classmethod
  def from_arrays(cls, name: str, x_train, y_train, x_test, y_test,
                  num_classes: int | None = None,
                  class_names: Sequence[str] = ()) -> Dataset:
    """Checks and converts raw arrays, computes the channel statistics.

    Args:
      name: names the dataset in every error message (for user files: include the path).
      x_train, x_test: integer images (N, H, W, C) or grayscale (N, H, W), values in [0, 255].
      y_train, y_test: integer labels (N,) or (N, 1).
      num_classes: defaults to `len(class_names)` or else the largest label + 1.
      class_names: optional names, one per class.

    Raises:
      DataError: on any dtype, shape or label-range problem.
    """
    x_train = _check_images(name, 'train', x_train)
    x_test = _check_images(name, 'test', x_test)
    if x_train.shape[1:] != x_test.shape[1:]:
      raise DataError(f'{name}: train images have shape {x_train.shape[1:]} but test images '
                      f'have {x_test.shape[1:]}; both splits must share one (H, W, C).')
    y_train = _check_labels(name, 'train', y_train, x_train.shape[0])
    y_test = _check_labels(name, 'test', y_test, x_test.shape[0])
    class_names = tuple(str(c) for c in class_names)
    if num_classes is None:
      num_classes = len(class_names) or int(max(y_train.max(), y_test.max())) + 1
    num_classes = int(num_classes)
    if class_names and len(class_names) != num_classes:
      raise DataError(f'{name}: {len(class_names)} class names given for {num_classes} '
                      'classes.')
    for split, y in (('train', y_train), ('test', y_test)):
      if y.max() >= num_classes:
        raise DataError(f'{name}: y_{split} has label {y.max()} but there are only '
                        f'{num_classes} classes (labels must lie in [0, {num_classes - 1}]).')
    mean, std = channel_stats(x_train)
    return cls(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
               num_classes=num_classes, mean=mean, std=std, class_names=class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(self.x_train.shape[1:])

  @property
  def num_train(self) -> int:
    return len(self.x_train)

  @property
  def num_test(self) -> int:
    return len(self.x_test)

  def test_image(self, index: int) -> tuple[np.ndarray, int]:
    """(uint8 image (H, W, C), label) of test example `index`."""
    return self.x_test[index], int(self.y_test[index])

  def eval_batches(self, batch_size: int):
    """The test split in batches of exactly `batch_size` ({'image', 'label', 'mask'}, the
    last one padded and masked), as a context manager like `Stream.eval_batches`."""
    from cnnjax.data.batching import eval_batches  # late: batching imports this module
    return contextlib.nullcontext(eval_batches(self.x_test, self.y_test, batch_size))

  def select_classes(self, classes: Sequence[int], relabel: bool = True) -> Dataset:
    """Keeps only the examples of `classes` in both splits (e.g. digits 0-4 for a transfer demo).

    Args:
      classes: distinct class labels to keep.
      relabel: if True, `classes[i]` becomes label `i` and `num_classes == len(classes)`;
        if False, labels and `num_classes` stay as they were.

    Returns:
      A new Dataset; its mean and std are recomputed on the kept training images.
    """
    classes = [int(c) for c in classes]
    if not classes:
      raise DataError(f'{self.name}: select_classes needs at least one class.')
    if len(set(classes)) != len(classes):
      raise DataError(f'{self.name}: select_classes got repeated classes {classes}.')
    bad = [c for c in classes if not 0 <= c < self.num_classes]
    if bad:
      raise DataError(f'{self.name}: classes {bad} do not exist (labels lie in '
                      f'[0, {self.num_classes - 1}]).')
    lookup = np.full(self.num_classes, -1, np.int32)
    lookup[classes] = np.arange(len(classes), dtype=np.int32) if relabel else classes
    keep_train = lookup[self.y_train] >= 0
    keep_test = lookup[self.y_test] >= 0
    names = self.class_names
    if relabel:
      names = tuple(names[c] for c in classes) if names else ()
    x_train = self.x_train[keep_train]
    mean, std = channel_stats(x_train)
    return Dataset(
        name=f'{self.name}[{",".join(map(str, classes))}]',
        x_train=x_train, y_train=lookup[self.y_train[keep_train]],
        x_test=self.x_test[keep_test], y_test=lookup[self.y_test[keep_test]],
        num_classes=len(classes) if relabel else self.num_classes,
        mean=mean, std=std, class_names=names)
