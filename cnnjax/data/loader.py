"""The one grain pipeline every streamed source goes through: order, rows, workers, state.

For one split, position p of this process's stream is example j of its rows of global batch
`step` (p = step * local_batch + j). Those rows are pure functions of the step
(`batching.train_rows`, `batching.eval_rows`: the in-memory path's order, so both paths see the
same batches, each process its contiguous share). Grain does the rest:

  MapDataset.range(positions) .map(read + decode + augment) .batch(local_batch)
    .to_iter_dataset() .mp_prefetch(workers)

Workers take whole batches round-robin, so the output order does not depend on their number.
Each example's augmentation draws from `np.random.default_rng([seed, global position])`: the
same on any number of workers, processes or restarts. `Batches.state()` is grain's iterator
state (JSON) plus the next step: stored in the checkpoint, it resumes the stream exactly.

A file that cannot be read or decoded stops the run with one sentence naming it, or, with
`skip_bad`, is replaced by the next readable example of the split (evaluation: masked out)
and counted. Worker processes exit when the training process dies, even by SIGKILL.
"""
from __future__ import annotations

import functools
import gc
import os
import struct
import threading
import traceback
import warnings
import weakref
import zlib
from collections import deque
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from cnnjax.data.batching import eval_rows, process_share, train_rows
from cnnjax.errors import DataError

STATE_FORMAT = 1
# What PIL and the file system raise on a missing, truncated, corrupt or hostile image file.
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                     Image.DecompressionBombError)
_MAX_REPLACEMENTS = 64   # consecutive unreadable examples before skipping gives up


def import_grain():
  """grain, usable from a plain script: grain 0.2.18 reads an absl flag that only a parsed
  command line defines (google/grain#1355, fixed after 0.2.18), so set it to its default."""
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  name = 'grain_enable_multiprocess_worker_profiling'
  if name in flags.FLAGS and not flags.FLAGS.is_parsed() and not flags.FLAGS[name].present:
    flags.FLAGS[name].parse('false')
  return grain


class Examples:
  """position -> one transformed example dict. Runs in the grain workers (picklable)."""

  def __init__(self, source, transform, image_shape: tuple[int, int, int],
               rows: Callable[[int], np.ndarray], local_batch: int, batch_size: int,
               process_index: int, seed: int, skip_bad: bool, masked: bool):
    self.source, self.transform, self.rows = source, transform, rows
    self.image_shape = tuple(image_shape)
    self.local_batch, self.batch_size, self.offset = local_batch, batch_size, \
        process_index * local_batch
    self.seed, self.skip_bad, self.masked = seed, skip_bad, masked
    self._cached = (None, None)

  def __getstate__(self):
    return {**self.__dict__, '_cached': (None, None)}

  def _rows(self, step: int) -> np.ndarray:
    if self._cached[0] != step:
      self._cached = (step, self.rows(step))
    return self._cached[1]

  def _load(self, row: int, rng) -> tuple[np.ndarray, int]:
    example = self.source[int(row)]
    return self.transform(example['image'], rng), example['label']

  def __call__(self, position: int) -> dict:
    try:
      return self._example(int(position))
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A bug: its type and traceback travel back as text (grain hangs on an exception it
      # cannot pickle, and the worker's traceback is the one worth reading).
      raise RuntimeError(f'{type(e).__name__} in a data worker: {e}\n'
                         f'{"".join(traceback.format_exception(e))}') from None

  def _example(self, position: int) -> dict:
    step, j = divmod(position, self.local_batch)
    row = int(self._rows(step)[j])
    rng = np.random.default_rng([self.seed, step * self.batch_size + self.offset + j])
    bad, mask = -1, row >= 0
    for attempt in range(_MAX_REPLACEMENTS):
      if row < 0:  # evaluation padding (or a skipped image): zeros, masked out
        image, label = np.zeros(self.image_shape, np.uint8), 0
        break
      try:
        image, label = self._load(row, rng)
        break
      except DataError as e:  # e.g. an image of another size where all must share one
        raise DataError(f'{self.source.describe(row)}: {e}') from None
      except _BAD_IMAGE_ERRORS as e:
        if not self.skip_bad:
          raise DataError(f'cannot read the image {self.source.describe(row)} '
                          f'({type(e).__name__}: {e}); replace or delete it, or set '
                          'data.skip_bad_images=true to skip unreadable files.') from None
        bad = row if bad < 0 else bad
        if self.masked:  # evaluation: the example is left out
          row, mask = -1, False
        else:            # training: the next example of the split takes its place
          row = (row + 1) % len(self.source)
    else:
      raise DataError(f'{_MAX_REPLACEMENTS} consecutive images from '
                      f'{self.source.describe(bad)} on are unreadable; is the data there?')
    element = {'image': image, 'label': np.int32(label), 'step': np.int64(step),
               'bad': np.int64(bad)}
    if self.masked:
      element['mask'] = np.bool_(mask)
    return element


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
  """worker_init_fn: a worker stops when `parent`, the process that started it, is gone
  (SIGKILL leaves it no chance to stop it) instead of waiting forever on a queue nobody
  reads. `parent` is passed in: a worker still starting when the parent died already has
  another parent when this runs."""
  del worker_index, worker_count

  def watch():
    while os.getppid() == parent:
      threading.Event().wait(1.0)
    os._exit(0)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True, name='cnnjax-parent-watch').start()


class Batches:
  """Host batches of one pass over a split, from grain, with the state to resume them.

  Iterating yields dicts of NumPy arrays ('image', 'label', and 'mask' for evaluation).
  `state()` after a batch resumes right after it; `skipped` counts replaced images.
  """

  def __init__(self, examples: Examples, steps: range, workers: int, buffer: int,
               state: dict | None = None):
    grain = import_grain()
    self.examples, self.steps, self.workers = examples, steps, workers
    # grain's state is relative to the pipeline it came from: rebuild that one (same origin,
    # same workers) and set it; otherwise (no state, or another worker count) start the
    # pipeline at steps.start, which continues the same stream just as exactly.
    resume = state is not None and state.get('workers') == workers and 'grain' in state
    if resume and int(state['next_step']) != steps.start:
      raise RuntimeError(f"the saved data state resumes at batch {state['next_step']} but the "
                         f'loop resumes at {steps.start}.')
    self._origin = int(state['origin']) if resume else steps.start
    lb = examples.local_batch
    dataset = grain.MapDataset.range(self._origin * lb, steps.stop * lb).map(examples).batch(
        lb, drop_remainder=True)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=1 if workers else min(8, os.cpu_count() or 1), prefetch_buffer_size=buffer))
    if workers:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=buffer),
          worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
    self._iterator = iter(dataset)
    # Closed by close(), or at exit while modules still exist (grain's helper iterators,
    # left to interpreter shutdown, fail noisily in __del__).
    self._finalizer = weakref.finalize(self, _close_iterator, self._iterator)
    self._start_state = self._iterator.get_state()
    if resume:
      self._iterator.set_state(state['grain'])
    self.next_step = steps.start
    self.skipped, self.first_bad = 0, None

  def rewind(self) -> None:
    """Back to the first batch, keeping the workers (evaluation passes reuse one Batches:
    starting workers costs seconds)."""
    if self._iterator is None:
      raise RuntimeError('rewind() of closed Batches.')
    self._iterator.set_state(self._start_state)
    self.next_step = self.steps.start

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if self.next_step >= self.steps.stop:
      raise StopIteration
    # A copy out of grain's shared memory: the block is released now, not whenever the
    # last reference to the batch dies (possibly at interpreter exit).
    batch = {k: np.array(v) for k, v in next(self._iterator).items()}
    step = int(batch.pop('step')[0])
    if step != self.next_step:
      raise RuntimeError(f'the data stream is at batch {step} but the loop expects '
                         f'{self.next_step}.')
    bad = batch.pop('bad')
    bad = bad[bad >= 0]
    if len(bad):
      if self.first_bad is None:
        self.first_bad = self.examples.source.describe(int(bad[0]))
      self.skipped += len(bad)
      warnings.warn(f'skipped {self.skipped} unreadable image(s) of '
                    f'{self.examples.source.name} so far (data.skip_bad_images); the first: '
                    f'{self.first_bad}.')
    self.next_step += 1
    return batch

  def state(self) -> dict:
    """JSON-able: resumes after the last batch returned (same workers: grain's own state)."""
    if self._iterator is None:  # finished: nothing is left to resume
      return {'format': STATE_FORMAT, 'next_step': self.next_step, 'workers': self.workers}
    return {'format': STATE_FORMAT, 'next_step': self.next_step, 'origin': self._origin,
            'workers': self.workers, 'grain': self._iterator.get_state()}

  def close(self) -> None:
    """Stops the workers (also done at exit)."""
    self._finalizer()
    self._iterator = None

  def __enter__(self) -> 'Batches':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _close_iterator(iterator) -> None:
  iterator.close()
  gc.collect()  # grain's helper iterators go now, not at interpreter shutdown


def train_batches(source, transform, image_shape, *, batch_size: int, steps_per_epoch: int,
                  seed: int, start_step: int, total_steps: int, workers: int, buffer: int = 2,
                  skip_bad: bool = False, process_index: int = 0, process_count: int = 1,
                  state: dict | None = None) -> Batches:
  """This process's rows of training batches start_step .. total_steps - 1."""
  rows = functools.partial(train_rows, len(source), batch_size, steps_per_epoch, seed,
                           process_index=process_index, process_count=process_count)
  local = batch_size // process_count
  process_share(batch_size, process_index, process_count)
  examples = Examples(source, transform, image_shape, rows, local, batch_size, process_index,
                      seed, skip_bad, masked=False)
  return Batches(examples, range(start_step, total_steps), workers, buffer, state)


def eval_batches(source, transform, image_shape, *, batch_size: int, workers: int, buffer: int = 2,
                 skip_bad: bool = False, process_index: int = 0,
                 process_count: int = 1) -> Batches:
  """This process's rows of every eval batch: each example once, the last batch padded."""
  rows = functools.partial(eval_rows, len(source), batch_size, process_index=process_index,
                           process_count=process_count)
  process_share(batch_size, process_index, process_count)
  examples = Examples(source, transform, image_shape, rows, batch_size // process_count,
                      batch_size, process_index, 0, skip_bad, masked=True)
  return Batches(examples, range(-(-len(source) // batch_size)), workers, buffer)


def ahead(batches: Iterator[dict], put: Callable[[dict], dict], size: int = 2):
  """(device batch, state after it) pairs, keeping `size` batches transferred ahead of the
  consumer, so the copy to the devices overlaps the step before (put is asynchronous)."""
  queue = deque()
  for batch in batches:
    queue.append((put(batch), batches.state() if hasattr(batches, 'state') else None))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def read_split(source, transform, image_shape, workers: int, batch_size: int = 256,
               skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as (uint8 images, int32 labels) in memory, decoded by the workers: how
  image folders reach the in-memory fast path."""
  images, labels = [], []
  batches = -(-len(source) // batch_size)
  # One batch gains nothing from worker processes (they cost seconds to start).
  workers = 0 if batches == 1 else min(workers, batches)
  with eval_batches(source, transform, image_shape, batch_size=min(batch_size, len(source)),
                    workers=workers, skip_bad=skip_bad) as batches:
    for batch in batches:
      images.append(batch['image'][batch['mask']])
      labels.append(batch['label'][batch['mask']])
  return np.concatenate(images), np.concatenate(labels)
