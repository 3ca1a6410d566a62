"""Freezing: which parameters train at a given step, and how the step leaves the others alone.

The one home of the concept. Config (``optimizer.frozen``, ``optimizer.trainable``,
``optimizer.unfreeze_after_epochs``; patterns as in `cnnjax.paths`) gives every parameter a label:

* 'train': updated from the first step;
* 'frozen': never updated (``frozen`` patterns, or everything outside ``trainable``);
* 'late': frozen until ``unfreeze_after_epochs``, then trained (gradual unfreezing).

Two consumers read the labels, so both always agree:

* the optimizer (`cnnjax.optim`) routes 'frozen' leaves to ``optax.set_to_zero`` (no updates, no
  optimizer state) and 'late' leaves to their own optimizer behind ``optax.conditionally_mask``,
  whose state stays at its initial value until the boundary step: its momentum and Adam moments
  start fresh at unfreezing, like a torch param group added at that moment;
* the train step (`cnnjax.train`) differentiates only the leaves that train at the current step:
  `untrained_paths` lists the others for `StepRecipe.frozen`, and `split` / `merge` take them out
  of and back into the parameter tree, so their gradients are never computed. The paths are
  static data of a compiled step, so the loop recompiles once, at `unfreeze_step`.
"""
from __future__ import annotations

from typing import Any

import flax
import jax

from cnnjax import paths

LABELS = ('train', 'frozen', 'late')


def _field(cfg: Any, key: str, default: Any) -> Any:
  if cfg is None:
    return default
  return cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)


def labels(opt_cfg: Any, params: Any) -> Any:
  """'train', 'frozen' or 'late' for every leaf of ``params``; raises on a pattern that matches
  no parameter."""
  names = paths.tree_paths(params)
  frozen = paths.matcher(names, _field(opt_cfg, 'frozen', ()), 'optimizer.frozen')
  trainable_patterns = paths.as_patterns(_field(opt_cfg, 'trainable', ()))
  trainable = paths.matcher(names, trainable_patterns, 'optimizer.trainable')
  held = 'late' if _field(opt_cfg, 'unfreeze_after_epochs', 0.0) > 0 else 'frozen'

  def label(path: str) -> str:
    return held if frozen(path) or (trainable_patterns and not trainable(path)) else 'train'
  return paths.map_paths(label, params)


def unfreeze_step(opt_cfg: Any, steps_per_epoch: int) -> int | None:
  """The optimizer step at which 'late' parameters start training (None when it is off)."""
  epochs = _field(opt_cfg, 'unfreeze_after_epochs', 0.0)
  return int(round(epochs * steps_per_epoch)) if epochs > 0 else None


def untrained_paths(opt_cfg: Any, params: Any, step: int = 0,
                    steps_per_epoch: int | None = None) -> tuple[str, ...]:
  """The sorted 'a/b/kernel' paths of the parameters that get no update at optimizer ``step``."""
  boundary = unfreeze_step(opt_cfg, steps_per_epoch) if steps_per_epoch else None
  unfrozen = boundary is not None and step >= boundary
  flat = dict(zip(paths.tree_paths(params), jax.tree.leaves(labels(opt_cfg, params))))
  return tuple(sorted(p for p, label in flat.items()
                      if label == 'frozen' or (label == 'late' and not unfrozen)))


def split(params: Any, frozen: tuple[str, ...]) -> tuple[dict, dict]:
  """(trainable, frozen) flat dicts keyed by 'a/b/c' paths: differentiate only the first."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  return ({k: v for k, v in flat.items() if k not in frozen},
          {k: v for k, v in flat.items() if k in frozen})


def merge(trainable: dict, fixed: dict) -> Any:
  """The parameter tree again, from the two halves of `split`."""
  return flax.traverse_util.unflatten_dict({**trainable, **fixed}, sep='/')
