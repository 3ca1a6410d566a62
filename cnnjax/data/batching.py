"""Host-side batching: a deterministic, resumable shuffle for training; padded, masked eval.

Training order depends only on (seed, epoch), so a run resumed at step k of an epoch sees
exactly the batches it would have seen. Evaluation visits every example exactly once: the
last partial batch is padded to the full batch size (one compiled shape) and `mask` marks the
real rows, so metrics are sums over masked rows divided by `mask.sum()`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from cnnjax.data.dataset import DataError


def _check_batch_size(n: int, batch_size: int) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise DataError(f'Batch size must be a positive integer, got {batch_size!r}.')
  if n < 1:
    raise DataError('Cannot make batches of an empty dataset.')


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Full training batches per epoch (the ragged end is dropped); at least one is required."""
  _check_batch_size(n, batch_size)
  steps = n // batch_size
  if steps == 0:
    raise DataError(f'Batch size {batch_size} is larger than the {n} training examples; '
                    'lower it.')
  return steps


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the `n` training examples in `epoch` (PCG64, stable across numpy versions)."""
  if seed < 0 or epoch < 0:
    raise DataError(f'Seed and epoch must be non-negative, got seed={seed}, epoch={epoch}.')
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields the full, shuffled batches of one epoch, from `start_step` on.

  Args:
    x, y: all training images and labels.
    batch_size: examples per batch; the last `len(x) % batch_size` examples of the shuffled
      order are skipped this epoch (a different set each epoch).
    seed, epoch: determine the permutation.
    start_step: first batch to yield (resume mid-epoch); 0 <= start_step <= steps_per_epoch.

  Yields:
    {'image': x[idx], 'label': y[idx]}.
  """
  n = len(x)
  if len(y) != n:
    raise DataError(f'{n} images but {len(y)} labels.')
  steps = steps_per_epoch(n, batch_size)
  if not 0 <= start_step <= steps:
    raise DataError(f'start_step {start_step} is outside [0, {steps}] (steps per epoch).')
  order = epoch_permutation(n, seed, epoch)
  for step in range(start_step, steps):
    idx = np.sort(order[step * batch_size:(step + 1) * batch_size])  # sorted: faster gather
    yield {'image': x[idx], 'label': y[idx]}


def num_eval_batches(n: int, batch_size: int) -> int:
  """Batches `eval_batches` yields for `n` examples (the last one may be padded)."""
  _check_batch_size(n, batch_size)
  return -(-n // batch_size)


def eval_batches(x: np.ndarray, y: np.ndarray,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example exactly once, in order, in batches of exactly `batch_size`.

  Yields:
    {'image', 'label', 'mask'}: `mask` (bool) is False on the zero padding that fills the
    last batch.
  """
  n = len(x)
  if len(y) != n:
    raise DataError(f'{n} images but {len(y)} labels.')
  for i in range(num_eval_batches(n, batch_size)):
    image = x[i * batch_size:(i + 1) * batch_size]
    label = y[i * batch_size:(i + 1) * batch_size]
    real = len(image)
    mask = np.ones(batch_size, bool)
    if real < batch_size:
      pad = batch_size - real
      image = np.concatenate([image, np.zeros((pad,) + image.shape[1:], image.dtype)])
      label = np.concatenate([label, np.zeros((pad,) + label.shape[1:], label.dtype)])
      mask[real:] = False
    yield {'image': image, 'label': label, 'mask': mask}
