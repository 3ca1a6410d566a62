"""The variables of a saved cnnjax checkpoint, for transfer learning and `--visualize`, and the
words for parameters that do not fit.

`load_variables(path)` reads just `params` and `batch_stats` of any cnnjax checkpoint (a workdir,
its `checkpoints/` directory or one step directory) as host arrays, without the optimizer state
and without building a `TrainState`; of a run with `train.ema_decay` it reads the moving average
of the weights (`ema/`, the model such a run delivers) unless `ema=False`. `describe_mismatch` names the missing, unexpected and
shape-mismatched paths between two `shapes_by_path` dicts; the checkpoint manager, transfer
learning and `--visualize` word their refusals with it.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from cnnjax import paths
from cnnjax.errors import CheckpointError


path_str = paths.param_path  # 'params/layer1_0/conv1/kernel' for a jax key path


def shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): tuple(getattr(leaf, 'shape', ())) for p, leaf in leaves}


def describe_mismatch(source: dict, target: dict, limit: int = 6) -> str:
  """'missing a, b; unexpected c; shape mismatch d (3, 2) vs (3, 5)' or '' when they match."""
  def listing(items):
    items = sorted(items)
    more = f' and {len(items) - limit} more' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more
  missing = [p for p in target if p not in source]
  unexpected = [p for p in source if p not in target]
  shapes = [f'{p} {source[p]} vs {target[p]}' for p in target
            if p in source and tuple(source[p]) != tuple(target[p])]
  parts = []
  if missing:
    parts.append(f'missing {listing(missing)}')
  if unexpected:
    parts.append(f'unexpected {listing(unexpected)}')
  if shapes:
    parts.append(f'shape mismatch (file vs model) {listing(shapes)}')
  return '; '.join(parts)


def metadata_tree(metadata):
  """The tree of ArrayMetadata inside whatever wrapper this orbax version returns."""
  metadata = getattr(metadata, 'item_metadata', metadata)
  return getattr(metadata, 'tree', metadata)


def find_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
  """The step directory `path` names: a step directory, a checkpoints directory (its newest step)
  or a workdir holding `checkpoints/`."""
  path = pathlib.Path(path).expanduser().absolute()
  if not path.exists():
    raise CheckpointError(f'checkpoint path {path} does not exist.')
  if not path.is_dir():
    raise CheckpointError(f'{path} is a file, not a cnnjax checkpoint directory.')
  if (path / 'state').is_dir():
    return path
  for candidate in (path / 'checkpoints', path):
    steps = sorted((int(p.name) for p in candidate.glob('*')
                    if p.name.isdigit() and (p / 'state').is_dir()), reverse=True)
    if steps:
      return candidate / str(steps[0])
  raise CheckpointError(f'{path} holds no cnnjax checkpoint (no <step>/state directory in it or '
                        f'in {path / "checkpoints"}).')


def holds_ema(step_dir: pathlib.Path) -> bool:
  """Whether the checkpoint in `step_dir` has a moving average of the weights."""
  saved = metadata_tree(ocp.PyTreeCheckpointHandler().metadata(step_dir / 'state'))
  return isinstance(saved, dict) and bool(saved.get('ema'))


def load_variables(path: str | pathlib.Path,
                   ema: bool = True) -> tuple[dict[str, Any], pathlib.Path]:
  """({'params': ..., 'batch_stats': ...} as host NumPy arrays, step directory) of a checkpoint:
  its moving average of the weights if it has one and `ema`, else the trained weights."""
  step_dir = find_checkpoint(path)
  # The item's handler, not a Checkpointer: a Checkpointer looks for the step-level metadata file
  # inside the item directory and logs a warning that it is missing (CheckpointManager keeps it
  # one level up).
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved = metadata_tree(handler.metadata(step_dir / 'state'))
    if not isinstance(saved, dict) or 'params' not in saved:
      raise CheckpointError(f'{step_dir} is not a cnnjax checkpoint (it has no params).')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
    source = 'ema' if ema and saved.get('ema') else None

    def wanted(path, leaf):  # params/... and batch_stats/..., under ema/ when reading the EMA
      keys = [getattr(p, 'key', None) for p in path]
      if source:
        keys = keys[1:] if keys[0] == source else [None]
      if keys and keys[0] in ('params', 'batch_stats'):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
      return ocp.PLACEHOLDER
    target = jax.tree_util.tree_map_with_path(wanted, saved)
    restored = handler.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'checkpoint {step_dir} is unreadable ({type(e).__name__}: '
                          f'{str(e)[:300]}).') from e
  restored = restored[source] if source else restored
  variables = {k: jax.device_get(restored[k]) for k in ('params', 'batch_stats')
               if restored.get(k)}
  return variables, step_dir


def check_fits(variables: dict, model, image_shape: tuple[int, ...], step_dir, model_name: str) -> None:
  """Raises CheckpointError naming the mismatched paths unless `variables` (read from
  `step_dir`) are exactly the variables `model` builds for images of `image_shape`."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  expected = jax.eval_shape(functools.partial(model.init, train=False),
                            {'params': jax.random.key(0)},
                            jnp.zeros((1, *image_shape), jnp.float32))
  mismatch = describe_mismatch(shapes_by_path(variables), shapes_by_path(dict(expected)))
  if mismatch:
    raise CheckpointError(f'checkpoint {step_dir} does not fit {model_name} as this config '
                          f'builds it ({mismatch}); pass the overrides it was trained with.')
