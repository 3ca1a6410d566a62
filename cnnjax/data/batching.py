"""Host-side batching: a deterministic, resumable shuffle for training; padded, masked eval.

Training order depends only on (seed, epoch), so a run resumed at step k of an epoch sees
exactly the batches it would have seen. `train_rows` / `eval_rows` are the same order as
example indices, per process: what the streaming loader reads (cnnjax/data/loader.py). Evaluation visits every example exactly once: the
last partial batch is padded to the full batch size (one compiled shape) and `mask` marks the
real rows, so metrics are sums over masked rows divided by `mask.sum()`.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from cnnjax.data.dataset import DataError
from cnnjax.errors import BatchSplitError


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
  for step in range(start_step, steps):
    idx = train_rows(n, batch_size, steps, seed, epoch * steps + step)  # sorted: faster gather
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


def process_share(batch_size: int, process_index: int, process_count: int) -> slice:
  """Process `process_index`'s contiguous rows of every global batch (`parallel.process_rows`
  is this for the running processes)."""
  if batch_size % process_count:
    raise BatchSplitError(f'a global batch of {batch_size} rows does not divide over '
                          f'{process_count} processes.')
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


@functools.lru_cache(maxsize=2)  # the epoch being read (and the next): one permutation each
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return epoch_permutation(num_examples, seed, epoch)


def train_rows(num_examples: int, batch_size: int, steps_per_epoch: int, seed: int, step: int,
               process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Example indices of this process's rows of training batch `step`."""
  epoch, in_epoch = divmod(step, steps_per_epoch)
  order = _epoch_order(num_examples, seed, epoch)
  rows = np.sort(order[in_epoch * batch_size:(in_epoch + 1) * batch_size])
  return rows[process_share(batch_size, process_index, process_count)]


def eval_rows(num_examples: int, batch_size: int, batch: int, process_index: int = 0,
              process_count: int = 1) -> np.ndarray:
  """Example indices of this process's rows of eval batch `batch`; -1 marks padding."""
  rows = np.arange(batch * batch_size, (batch + 1) * batch_size)
  rows[rows >= num_examples] = -1
  return rows[process_share(batch_size, process_index, process_count)]
