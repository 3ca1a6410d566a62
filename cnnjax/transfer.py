"""Transfer learning: load pretrained weights into freshly initialized variables, strictly.

`init_from_pretrained(variables, config.transfer, model_name)` is what the training loop calls
(after initializing the model, before resuming, so a resumed run keeps its own weights). The
source `transfer.init_from` is

* a cnnjax checkpoint: a workdir, its `checkpoints/` directory, or one step directory in it
  (of a run with `train.ema_decay`: its moving average of the weights, cnnjax/ema.py);
* a torchvision state_dict: `.safetensors` (no torch needed) or `.pth`/`.pt` (read with
  `torch.load(weights_only=True)`), for every torchvision model of the zoo (see
  cnnjax/torchvision_weights.py for the name map and layouts; GoogLeNet's and Inception v3's
  auxiliary classifiers in the file are ignored, and said so).

Strict by default: every parameter and BatchNorm statistic of the model must be in the source with
the same shape, and every array of the source must be used, unless its path matches one of
`transfer.exclude` (same pattern syntax as `optimizer.frozen`: a regular expression matching a
whole path like 'fc/kernel' or a prefix ending at '/', so 'fc' is the ResNet head). Excluded
model variables keep their fresh initialization (the head when `num_classes` differs). Anything
else is refused with a CheckpointError listing the paths.
"""
from __future__ import annotations

import pathlib
from typing import Iterable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import checkpoint, paths, torchvision_weights
from cnnjax.checkpoint import CheckpointError

Flat = dict[tuple[str, str], np.ndarray]  # {(collection, 'a/b/kernel'): array}
COLLECTIONS = ('params', 'batch_stats')


def flatten_variables(variables: dict) -> Flat:
  flat = {}
  for collection in COLLECTIONS:
    for path, value in flax.traverse_util.flatten_dict(
        flax.core.unfreeze(variables.get(collection, {})), sep='/').items():
      flat[(collection, path)] = value
  return flat


def load_source(path: str | pathlib.Path, model_name: str) -> tuple[Flat, str]:
  """(flat variables, a description for messages) of a checkpoint directory or weights file."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    hint = (torchvision_weights.where_to_get(path, model_name)
            if path.suffix.lower() in torchvision_weights.SUFFIXES else '')
    raise CheckpointError(f'transfer.init_from {path} does not exist{hint}.')
  if path.is_dir():
    variables, step_dir = checkpoint.load_variables(path)  # a run's EMA weights if it kept one
    ema = ' (its moving average of the weights)' if checkpoint.holds_ema(step_dir) else ''
    return flatten_variables(variables), f'checkpoint {step_dir}{ema}'
  state_dict = torchvision_weights.read_state_dict(path)
  heads = torchvision_weights.aux_heads(state_dict, model_name)
  if heads and jax.process_index() == 0:
    print(f'transfer: ignoring the auxiliary classifiers {", ".join(heads)} in {path} '
          f'({model_name} is built without them).')
  return torchvision_weights.convert(state_dict, model_name, str(path)), f'weights file {path}'


def check_fits(target: dict, source: dict, exclude: Iterable[str] = (), what: str = 'the source',
               model_name: str = 'the model') -> list[str]:
  """Raises CheckpointError unless `source` covers `target` exactly outside `exclude`.

  Both map (collection, path) to anything with a `.shape`. Returns the sorted paths that stay
  freshly initialized (the model's excluded variables).
  """
  # A pattern that matches nothing on either side is a typo: an error.
  matches = paths.matcher([path for _, path in [*target, *source]], exclude, 'transfer.exclude')

  def excluded(key):
    return matches(key[1])
  wanted = {_name(k): tuple(v.shape) for k, v in target.items() if not excluded(k)}
  given = {_name(k): tuple(v.shape) for k, v in source.items() if not excluded(k)}
  mismatch = checkpoint.describe_mismatch(given, wanted)
  if mismatch:
    raise CheckpointError(
        f'{what} does not fit {model_name} ({mismatch}); if these should stay freshly '
        f'initialized (e.g. the classifier head when num_classes differs), list them in '
        f'transfer.exclude.')
  return sorted(_name(k) for k in target if excluded(k))


def _name(key: tuple[str, str]) -> str:
  return f'{key[0]}/{key[1]}'


def merge(variables: dict, source: Flat, exclude: Iterable[str] = (), what: str = 'the source',
          model_name: str = 'the model') -> tuple[dict, list[str]]:
  """`variables` with every array taken from `source` except the excluded paths (strict).

  Returns (new variables, sorted paths left freshly initialized); see `check_fits`.
  """
  target = flatten_variables(variables)
  fresh = set(check_fits(target, source, exclude, what, model_name))
  merged = {k: v if _name(k) in fresh else jnp.asarray(source[k], dtype=v.dtype)
            for k, v in target.items()}
  out = dict(variables)
  for collection in COLLECTIONS:
    if collection in variables:
      out[collection] = flax.traverse_util.unflatten_dict(
          {path: v for (c, path), v in merged.items() if c == collection}, sep='/')
  return out, sorted(fresh)


def init_from_pretrained(variables: dict, transfer_config: ml_collections.ConfigDict,
                         model_name: str) -> dict:
  """`variables` with the weights of `transfer_config.init_from` loaded (unchanged if it is '')."""
  if not transfer_config.init_from:
    return variables
  source, what = load_source(transfer_config.init_from, model_name)
  merged, fresh = merge(variables, source, transfer_config.exclude, what, model_name)
  if jax.process_index() == 0:
    kept = f'; freshly initialized: {", ".join(fresh)}' if fresh else ''
    print(f'transfer: {model_name} initialized from {what}{kept}')
  return merged
