"""Switches read while tracing: a context manager for code, an environment variable for runs.

cnnjax's CPU fast paths and kernel choices (`cnnjax.fast_paths.cpu_fast_paths`,
`cnnjax.kernels.use_onednn`, `use_winograd`, `use_bfloat16_arithmetic`) are read when a function
is traced, so ``with switch(value):`` decides for what is traced inside, in this thread or task
only. Some also have an environment variable (``CNNJAX_ONEDNN``, ``CNNJAX_BFLOAT16_CONV``) that
`env_choice` reads: a value that is no setting is a `ConfigError`, because a typo must not
silently run the other way.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator


class TraceSwitch:
  """A value that ``with switch(value):`` sets for the code inside; `get()` reads it."""

  def __init__(self, name: str, default: Any = None):
    self._value = contextvars.ContextVar(f'cnnjax_{name}', default=default)

  @contextlib.contextmanager
  def __call__(self, value: Any) -> Iterator[None]:
    token = self._value.set(value)
    try:
      yield
    finally:
      self._value.reset(token)

  def get(self) -> Any:
    return self._value.get()


def env_choice(variable: str, choices: dict[str, Any], settings: str) -> Any:
  """What environment `variable` asks for: ``choices[value]`` (stripped, lower case; unset is
  ''). Any other value raises a `ConfigError` naming the variable and its `settings`."""
  from cnnjax.errors import ConfigError
  value = os.environ.get(variable, '')
  if value.strip().lower() in choices:
    return choices[value.strip().lower()]
  raise ConfigError(f'{variable}={value!r} is not a setting: use {settings}.')
