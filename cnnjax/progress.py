"""What the training loop shows while it runs: the progress bar, mean metrics over a log
interval, and the training throughput (images per second, compilation and pauses excluded)."""
from __future__ import annotations

import contextlib
import sys
import time

import numpy as np


class Throughput:
  """Training images per second, from the end of the first (compiling) log interval on,
  excluding the time spent in evaluation and checkpointing; None until a second interval ends
  (a rerun of a finished run, or a resume with one interval left, measures nothing)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.steps, self.seconds, self._since = 0, 0.0, None

  def count(self, steps: int) -> None:
    now = time.time()
    if self._since is not None:  # the first interval includes compilation: not counted
      self.steps += steps
      self.seconds += now - self._since
    self._since = now

  def images_per_second(self) -> float | None:
    return self.steps * self.batch_size / self.seconds if self.seconds else None

  @contextlib.contextmanager
  def paused(self):
    start = time.time()
    yield
    if self._since is not None:
      self._since += time.time() - start


def mean_metrics(rows: list[dict]) -> dict:
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def progress_bar(config, total, initial, primary):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, file=sys.stdout,
              disable=not (primary and config.train.progress_bar), leave=False)
