"""When a checkpoint cannot be written: one TrainingError in words, and nothing left half-done.

`Checkpoints` (cnnjax/checkpoint.py) calls these. `check_space` refuses a save that cannot fit
(one as big as the newest checkpoint) before orbax writes anything, the clean case of a full
disk. Any other failure — the disk filling up during a write, a lost filesystem — comes out of
orbax's background threads; `remove_partial` deletes the step directory orbax did not commit and
`save_failed` words the error. In both cases the earlier checkpoints stay as they are (orbax
deletes old checkpoints only after a new one is complete), so rerunning resumes from them.

`QuietOrbax` drops orbax's own log lines about what these words replace (the tracebacks of a
failed save, the asyncio reports of its writes still in flight when it failed, and the warning
that a save between evaluations has no metrics).
"""
from __future__ import annotations

import errno
import logging
import pathlib
import shutil
import threading
import time

from cnnjax.errors import TrainingError

TMP_MARK = '.orbax-checkpoint-tmp'  # in the name of a step directory orbax has not committed


class QuietOrbax(logging.Filter):
  """A filter for the 'absl' logger orbax logs through, and for 'asyncio', which reports the
  exceptions of orbax's writes that were still in flight when its save failed."""

  LOGGERS = ('absl', 'asyncio')

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == 'asyncio':
      return not (_through_orbax(record.exc_info) or _about_a_partial_step(record))
    if not _in_orbax(record.pathname):
      return True
    return record.levelno < logging.ERROR and 'tracked_metric' not in record.getMessage()

  def __enter__(self) -> 'QuietOrbax':
    for name in self.LOGGERS:
      logging.getLogger(name).addFilter(self)
    return self

  def __exit__(self, *exc) -> None:
    for name in self.LOGGERS:
      logging.getLogger(name).removeFilter(self)


def _in_orbax(filename: str) -> bool:
  return '/orbax/' in filename.replace('\\', '/')


def _through_orbax(exc_info) -> bool:
  traceback = exc_info[2] if isinstance(exc_info, tuple) else None
  while traceback is not None:
    if _in_orbax(traceback.tb_frame.f_code.co_filename):
      return True
    traceback = traceback.tb_next
  return False


def _about_a_partial_step(record: logging.LogRecord) -> bool:
  """True for a report that names a step directory orbax had not committed: a write awaited
  only through tensorstore's futures has no orbax frame in its traceback, only the path."""
  error = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
  return TMP_MARK in record.getMessage() or TMP_MARK in str(error)


def committed_steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _intact(directory: pathlib.Path) -> str:
  kept = committed_steps(directory)
  return (f'the checkpoints before it are intact (newest: step {kept[-1]})' if kept else
          'no earlier checkpoint exists')


def check_space(directory: pathlib.Path, step: int) -> None:
  """Raises TrainingError when the disk has less room than the newest checkpoint takes."""
  kept = committed_steps(directory)
  if not kept:
    return
  need = sum(f.lstat().st_blocks * 512 for f in (directory / str(kept[-1])).rglob('*'))
  free = shutil.disk_usage(directory).free
  if free < need:
    raise TrainingError(
        f'saving step {step} in {directory} needs about {need / 2**20:.1f} MiB but '
        f'{free / 2**20:.1f} MiB are free; {_intact(directory)}: free some space and rerun the '
        f'same command to resume.')


def remove_partial(directory: pathlib.Path, timeout: float = 30.0) -> None:
  """Deletes the step directories orbax had not committed (only this run writes there), once
  orbax's threads for the failed save are done: they may still create directories in them."""
  deadline = time.time() + timeout
  for thread in threading.enumerate():
    if type(thread).__module__.startswith('orbax') and thread is not threading.current_thread():
      try:
        thread.join(max(deadline - time.time(), 0))
      except Exception:  # pylint: disable=broad-except  (orbax's join re-raises the failure)
        pass
  for leftover in directory.glob(f'*{TMP_MARK}*'):
    shutil.rmtree(leftover, ignore_errors=True)


def save_failed(directory: pathlib.Path, step: int | None, error: Exception) -> TrainingError:
  """The error to raise for a save of `step` that failed with `error`."""
  full = getattr(error, 'errno', None) == errno.ENOSPC or 'No space left' in str(error)
  reason = ('no space left on the device' if full else
            f'{type(error).__name__}: {" ".join(str(error).split())[:300]}')
  what = f'step {step}' if step is not None else 'a checkpoint'
  return TrainingError(
      f'saving {what} in {directory} failed ({reason}); {_intact(directory)}: '
      f'{"free some space" if full else "fix the cause"} and rerun the same command to resume.')
