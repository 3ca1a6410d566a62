"""Parameter paths and path patterns: how config names a set of parameters.

A parameter's path joins its keys in the ``params`` collection with '/', e.g.
``layer1_0/conv1/kernel`` or ``fc/bias``. A pattern is a regular expression that must match a
whole path, or a whole prefix of it ending at a '/': 'fc' selects every parameter under module
``fc``, 'layer[12]_.*' everything in layer1 and layer2, '.*/kernel' every kernel. A pattern that
matches nothing is an error (it is a typo). `optimizer.frozen`, `optimizer.trainable`,
`optimizer.lr_multipliers` and `transfer.exclude` all use this syntax.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax

from cnnjax.errors import ConfigError


def param_path(keypath: Iterable[Any]) -> str:
  """'layer1_0/conv1/kernel' for a key path from ``jax.tree_util.tree_flatten_with_path``."""
  parts = []
  for key in keypath:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def tree_paths(tree: Any) -> list[str]:
  """The path of every leaf of ``tree``, in flattening order."""
  return [param_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_paths(fn: Callable[[str], Any], tree: Any) -> Any:
  """A tree like ``tree`` holding ``fn(path)`` at every leaf."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: fn(param_path(kp)), tree)


def as_patterns(value: Any) -> tuple[str, ...]:
  """A config value (one pattern string or a sequence of them) as a tuple of patterns."""
  return (value,) if isinstance(value, str) else tuple(value)


def compile_pattern(pattern: str, what: str = 'parameter') -> re.Pattern:
  """The regular expression matching ``pattern``'s paths (whole path or a '/'-ended prefix)."""
  try:
    return re.compile(f'(?:{pattern})(?:/.*)?')
  except re.error as e:
    raise ConfigError(f'{what} pattern {pattern!r} is not a valid regular expression ({e}).') from None


def matcher(paths: Iterable[str], patterns: Iterable[str], what: str) -> Callable[[str], bool]:
  """A path -> bool function for ``patterns``; raises when a pattern matches none of ``paths``."""
  patterns, paths = as_patterns(patterns), list(paths)
  compiled = [compile_pattern(p, what) for p in patterns]
  for pattern, rx in zip(patterns, compiled):
    if not any(rx.fullmatch(path) for path in paths):
      example = f' (e.g. {paths[0]!r})' if paths else ''
      raise ConfigError(f'{what} pattern {pattern!r} matches no parameter{example}.')
  return lambda path: any(rx.fullmatch(path) for rx in compiled)


def pattern_mask(tree: Any, patterns: Iterable[str], what: str = 'parameter') -> Any:
  """A tree of bools like ``tree``: True where the leaf's path matches one of ``patterns``."""
  return map_paths(matcher(tree_paths(tree), patterns, what), tree)
