"""Checkpoints of a whole `TrainState` through orbax-checkpoint's `CheckpointManager`.

`Checkpoints(workdir / 'checkpoints', config.checkpoint)` saves asynchronously (the device-to-host
copy blocks, the file writing does not), keeps the newest `keep` checkpoints plus the best one by
`best_metric`, and restores the newest *valid* checkpoint: one that cannot be read is moved aside
to `<directory>/corrupt/` with a warning and the previous one is used. Orbax writes each step into
a temporary directory that is renamed only when complete, so a process killed in the middle of a
save leaves nothing that restores wrong (the leftover is removed on the next start, which
`cnnjax.workdir_lock` makes sure is the only writer).

A save that fails (a full disk, a lost filesystem), in the background or not, surfaces at the
next `save` or at `close` as one `TrainingError` naming the directory and the step: its
half-written directory is removed, the earlier checkpoints are left as they are, and rerunning
resumes from the newest of them (cnnjax/checkpoint_failures.py).

A checkpoint holds the state as plain arrays (the typed PRNG key as its raw `key_data`; with
`train.ema_decay` the weights' moving average under `ema/params` and `ema/batch_stats`) in the
item `state`, a JSON item `meta` with the step, the data position (epoch, step in epoch, steps
per epoch) and the key's implementation, and, when it was saved after an evaluation, orbax's
`metrics` item (`evaluations()` reads them back); a streamed run adds the JSON item `data`, its
loader's state (`save(data=...)`, `data_state` after restoring), so the input resumes exactly
where the checkpoint was taken. Arrays are restored into the shardings of the
state passed to `restore_latest`, so a checkpoint saved on 8 devices restores on 1 and back.
Reading only the model variables of a checkpoint (transfer learning, `--visualize`) is
`cnnjax.checkpoint_variables.load_variables`.
"""
from __future__ import annotations

import gc
import pathlib
import shutil
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

# describe_mismatch, find_checkpoint, load_variables and path_str are re-exported: callers use
# them as checkpoint.load_variables and so on.
from cnnjax import checkpoint_failures as failures
from cnnjax.checkpoint_variables import (  # noqa: F401
    check_fits, describe_mismatch, find_checkpoint, holds_ema, load_variables, metadata_tree, path_str,
    shapes_by_path)
from cnnjax.errors import CheckpointError  # noqa: F401  (re-exported: raised here)

_FORMAT = 1  # bump when the layout of `state` or `meta` changes


def minimizes(metric: str) -> bool:
  """Whether a smaller value of `metric` is better (losses and errors)."""
  return metric.endswith(('loss', 'error', 'err'))


def _is_typed_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_tree(state) -> dict:
  """The arrays of a TrainState as a plain dict (the typed key as its raw uint32 data)."""
  rng = jax.random.key_data(state.rng) if _is_typed_key(state.rng) else state.rng
  tree = {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state, 'rng': rng}
  if getattr(state, 'ema', None) is not None:  # runs without an EMA keep the layout they had
    tree['ema'] = state.ema
  return tree


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Checkpoints:
  """Saves, keeps and restores the checkpoints of one run in `directory`.

  Args:
    directory: where the step directories go (created if missing).
    config: `config.checkpoint`: `keep` (newest checkpoints kept), `best_metric` (a metric passed
      to `save`, e.g. 'test_accuracy'; names ending in loss/error are minimized; '' = no best),
      `every_steps` (read by the loop).
    steps_per_epoch: if given, stored with each checkpoint and checked on restore, because the
      data order (a function of epoch and step in epoch) only continues exactly when it matches.
  """

  def __init__(self, directory: str | pathlib.Path, config: ml_collections.ConfigDict,
               steps_per_epoch: int | None = None):
    self.directory = pathlib.Path(directory).absolute()
    if self.directory.exists() and not self.directory.is_dir():
      raise CheckpointError(f'checkpoint directory {self.directory} is a file, not a directory.')
    if int(config.keep) < 1:
      raise CheckpointError(f'checkpoint.keep must be at least 1, got {config.keep}.')
    self.best_metric = str(config.best_metric)
    self.steps_per_epoch = steps_per_epoch
    keep = [policies.LatestN(n=int(config.keep))]
    # Orbax writes a checkpoint's metrics to disk only when best_fn is set, so it always is:
    # without best_metric it ranks nothing (the preservation policy alone decides what is kept).
    best_fn = lambda metrics: 0.0  # pylint: disable=unnecessary-lambda-assignment
    if self.best_metric:
      best_fn = lambda metrics: float(metrics[self.best_metric])  # pylint: disable=unnecessary-lambda-assignment
      keep.append(policies.BestN(get_metric_fn=best_fn, reverse=minimizes(self.best_metric),
                                 n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep), best_fn=best_fn,
        best_mode='min' if minimizes(self.best_metric) else 'max',
        cleanup_tmp_directories=True, create=True, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler(),
        'data': ocp.JsonCheckpointHandler()})
    self.data_state: dict | None = None  # the `data` item restore_latest found, if any
    self._pending: int | None = None  # the step whose files are being written in the background
    self._closed = False
    self._quiet = failures.QuietOrbax().__enter__()  # until a clean close

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    return self._manager.best_step() if self.best_metric else None

  def evaluations(self) -> dict[int, dict[str, float]]:
    """{step: metrics} of the kept checkpoints that were saved with metrics.

    The best checkpoint by `best_metric` is always kept, so the best of these is the best
    evaluation of the whole run, across resumes. Call after `close` (or a forced save) to see
    the newest save too.
    """
    found = {}
    for step in self.all_steps():
      metrics = self._manager.metrics(step)
      if metrics:
        found[step] = {k: float(v) for k, v in metrics.items()}
    return found

  def save(self, step: int, state, metrics: dict | None = None, force: bool = False,
           data: dict | None = None) -> None:
    """Starts an asynchronous save of `state` as `step` (a step already saved is skipped).

    `metrics` (e.g. {'test_accuracy': 0.98}) ranks the checkpoint for `best_metric`. A state
    with NaN or infinite parameters is not saved (with a warning), so it can never push a good
    checkpoint out. `force=True` (a preemption) also waits until the files are written.
    """
    step = int(step)
    if step in self._manager.all_steps():
      if force:
        self._finish_pending()
      return
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
      if self.best_metric and self.best_metric not in metrics:
        raise CheckpointError(
            f"checkpoint.best_metric '{self.best_metric}' is not among the metrics saved with "
            f"the checkpoints in {self.directory}: {', '.join(sorted(metrics))}.")
    if not bool(_all_finite(state.params)):
      warnings.warn(f'not saving step {step} to {self.directory}: the parameters are not finite.')
      return
    meta = {'format': _FORMAT, 'step': step,
            'rng_impl': str(jax.random.key_impl(state.rng)) if _is_typed_key(state.rng) else '',
            'steps_per_epoch': self.steps_per_epoch}
    if self.steps_per_epoch:
      meta['epoch'], meta['step_in_epoch'] = divmod(step, self.steps_per_epoch)
    self._finish_pending()  # a failure of the previous save surfaces here, under its own step
    if jax.process_count() == 1:  # on several hosts a refusal would have to be collective
      failures.check_space(self.directory, step)
    try:
      items = {'data': ocp.args.JsonSave(data)} if data is not None else {}
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_tree(state)), meta=ocp.args.JsonSave(meta), **items),
          metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except  (any failure to write: see _failed)
      self._failed(step, e)
    self._pending = step
    if force:
      self._finish_pending()

  def restore_latest(self, state):
    """`state` with the arrays of the newest readable checkpoint (unchanged if there is none).

    Raises CheckpointError when the checkpoint belongs to another architecture or optimizer
    (naming the mismatched paths) or was written with another number of steps per epoch.
    """
    self._finish_pending()  # a save still being written is not readable yet
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return state
    target = state_tree(state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    broken = []
    for step in steps:
      step_dir = self.directory / str(step)
      try:
        saved_shapes = shapes_by_path(metadata_tree(self._manager.item_metadata(step)['state']))
        if not saved_shapes:
          raise ValueError('it lists no arrays')
      except Exception as e:  # pylint: disable=broad-except
        broken.append((step, e))
        continue
      self._check_fits(step_dir, saved_shapes, shapes_by_path(target))
      try:
        items = {'data': ocp.args.JsonRestore()} if (step_dir / 'data').is_dir() else {}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore(), **items))
        meta = dict(restored['meta'])
        if int(restored['state']['step']) != step or int(meta['step']) != step:
          raise ValueError(f'it holds step {int(restored["state"]["step"])}, not {step}')
      except Exception as e:  # pylint: disable=broad-except
        broken.append((step, e))
        continue
      self._check_data_position(step_dir, meta)
      self._set_aside(broken)
      self.data_state = dict(restored['data']) if items else None
      return self._replace(state, restored['state'], meta)
    raise CheckpointError(
        f'no checkpoint in {self.directory} is readable (steps {", ".join(map(str, steps))}; '
        f'newest error: {type(broken[0][1]).__name__}: {broken[0][1]}).')

  @staticmethod
  def _check_fits(step_dir: pathlib.Path, saved: dict, target: dict) -> None:
    """Raises naming the mismatched paths: model variables first, then the optimizer state."""
    def part(shapes, prefixes):
      return {p: s for p, s in shapes.items() if p.startswith(prefixes)}
    model = ('params/', 'batch_stats/')
    mismatch = describe_mismatch(part(saved, model), part(target, model))
    if mismatch:
      raise CheckpointError(
          f'checkpoint {step_dir} is of another architecture ({mismatch}); use another workdir, '
          f'or transfer.init_from with transfer.exclude to load the parts that fit.')
    saved_ema, target_ema = (any(p.startswith('ema/') for p in s) for s in (saved, target))
    if saved_ema != target_ema:
      raise CheckpointError(
          f'checkpoint {step_dir} was written {"with" if saved_ema else "without"} a moving '
          f'average of the weights (train.ema_decay); resume with the train.ema_decay it had, or '
          f'use another workdir with transfer.init_from={step_dir} to start from its weights.')
    mismatch = describe_mismatch(saved, target)
    if mismatch:
      raise CheckpointError(
          f'checkpoint {step_dir} was written with another optimizer configuration ({mismatch}); '
          f'use another workdir with transfer.init_from={step_dir} to start from its weights.')

  def _check_data_position(self, step_dir: pathlib.Path, meta: dict) -> None:
    saved = meta.get('steps_per_epoch')
    if self.steps_per_epoch and saved and int(saved) != self.steps_per_epoch:
      raise CheckpointError(
          f'checkpoint {step_dir} was written with {saved} steps per epoch but this run has '
          f'{self.steps_per_epoch} (the batch size or the data changed), so the data order '
          f'cannot continue exactly; use a new workdir with transfer.init_from={step_dir}.')
    if saved and 'epoch' in meta:
      if int(meta['epoch']) * int(saved) + int(meta['step_in_epoch']) != int(meta['step']):
        raise CheckpointError(f'checkpoint {step_dir} has an inconsistent data position {meta}.')

  def _set_aside(self, broken: list[tuple[int, Exception]]) -> None:
    """Moves unreadable checkpoints newer than the restored one out of the way (never deletes)."""
    if not broken:
      return
    if jax.process_index() == 0:
      aside = self.directory / 'corrupt'
      aside.mkdir(exist_ok=True)
      for step, error in broken:
        destination = aside / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
        warnings.warn(f'checkpoint {self.directory / str(step)} is unreadable '
                      f'({type(error).__name__}: {str(error)[:300]}); moved it to {destination} '
                      f'and resumed from the previous valid checkpoint.')
        shutil.move(str(self.directory / str(step)), str(destination))
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes('cnnjax_checkpoint_set_aside')
    self._manager.reload()

  @staticmethod
  def _replace(state, tree: dict, meta: dict):
    rng = tree['rng']
    if meta.get('rng_impl'):
      rng = jax.random.wrap_key_data(rng, impl=meta['rng_impl'])
    ema = {'ema': tree['ema']} if 'ema' in tree else {}  # the state asked for it (state_tree)
    return state.replace(step=tree['step'], params=tree['params'],
                         batch_stats=tree['batch_stats'], opt_state=tree['opt_state'], rng=rng,
                         **ema)

  def _finish_pending(self) -> None:
    """Waits for the save in flight; its failure becomes a TrainingError (see `_failed`)."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)

  def _failed(self, step: int | None, error: Exception):
    """Removes the failed save's leftovers, ends orbax's threads and raises TrainingError."""
    try:
      self._manager.close()  # nothing is in flight any more: this only ends orbax's threads
    except Exception:  # pylint: disable=broad-except  (the first error is the one to report)
      pass
    if jax.process_index() == 0:
      failures.remove_partial(self.directory)
    gc.collect()  # asyncio reports a failed write when its task is collected: now, not at exit
    self._closed = True  # orbax's other threads may still log this failure: the filter stays
    raise failures.save_failed(self.directory, step, error) from error

  def close(self) -> None:
    """Waits for the asynchronous saves to finish (raising TrainingError if one failed) and
    releases the manager."""
    if self._closed:
      return
    self._finish_pending()
    self._closed = True
    self._manager.close()
    self._quiet.__exit__()

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # already failing: still wait for the save in flight, but report the first error
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


