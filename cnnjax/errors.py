"""The errors a user can cause, as cnnjax's own exception types (one home for all of them).

Each is raised with one sentence that says what is wrong and how to fix it. `run.py` prints that
sentence and exits with status 2, without a traceback, for exactly these types and nothing else:
any other exception is a bug and keeps its traceback. Library users can catch `CnnjaxError`.

The subclasses also derive from the built-in type a Python user would expect (`ValueError` for a
bad value, `RuntimeError` for a run that cannot go on), so `except ValueError` keeps working.
"""
from __future__ import annotations


class CnnjaxError(Exception):
  """Base of every error a user can cause and fix (a flag, a file, a directory, a setting)."""


class ConfigError(CnnjaxError, ValueError):
  """A bad experiment name, config key or config value, or a model option the model lacks."""


class BatchSplitError(ConfigError):
  """A train batch that does not divide over the devices (or the processes)."""


class ShapeError(CnnjaxError, ValueError):
  """An input shape a layer or model cannot take (wrong rank, too small for its kernels)."""


class DataError(CnnjaxError, ValueError):
  """Missing, undownloadable, unreadable or inconsistent data."""


class CheckpointError(CnnjaxError, ValueError):
  """A checkpoint or weights file that cannot be used (names the file and why)."""


class WorkdirBusyError(CnnjaxError, RuntimeError):
  """Another live run holds the workdir (names its pid and host)."""


class TrainingError(CnnjaxError, RuntimeError):
  """Training cannot go on (a NaN loss, a failed save); the last good checkpoint is kept."""


class ExportError(CnnjaxError, RuntimeError):
  """An export that cannot be made here (a missing package, an op its converter lacks) or whose
  exported model computes other logits than the JAX model; nothing is kept."""
