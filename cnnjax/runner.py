"""The training loop: config -> data -> model and state -> compiled steps -> metrics and checkpoints.

`run(config, workdir)` is what `python run.py` calls, and what a notebook or a test calls. Data
flows one way; the loop only feeds batches to `train.train_step` and records what comes back.
Rerunning with the same workdir resumes from the newest valid checkpoint, with the same data
order and random keys as an uninterrupted run (both are derived from the step number).
"""
from __future__ import annotations

import math
import pathlib
import signal
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import checkpoint, data, models, optim, parallel, recorder, train, transfer, viz


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


def build_model(config: ml_collections.ConfigDict, dataset: data.Dataset):
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}.get(config.model.dtype)
  if dtype is None:
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got '{config.model.dtype}'.")
  return models.get_model(config.model.name, num_classes=dataset.num_classes,
                          in_channels=dataset.x_train.shape[-1], dtype=dtype,
                          **config.model.kwargs.to_dict())


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
  dataset = data.load_dataset(config.data.name, data_dir=config.data.data_dir or None)
  if config.data.classes:
    dataset = dataset.select_classes(tuple(config.data.classes))
  return dataset


def make_recipe(config: ml_collections.ConfigDict, dataset: data.Dataset,
                frozen: tuple[str, ...] = (), axis_name: str | None = None) -> train.StepRecipe:
  return train.StepRecipe(
      mean=tuple(dataset.mean), std=tuple(dataset.std), crop_padding=config.data.crop_padding,
      pad_mode=config.data.pad_mode, flip=config.data.flip,
      label_smoothing=config.train.label_smoothing, frozen=frozen, axis_name=axis_name)


def evaluate(state: train.TrainState, x: np.ndarray, y: np.ndarray, batch_size: int,
             recipe: train.StepRecipe, mesh) -> dict:
  """Loss, top-1 and top-5 accuracy over every example of (x, y) exactly once."""
  lo, hi = _process_slice(batch_size)
  totals = None
  for batch in data.eval_batches(x, y, batch_size):
    local = {k: v[lo:hi] for k, v in batch.items()}
    sums = train.jit_eval_step(state, parallel.shard_batch(local, mesh), recipe)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'accuracy': float(totals['correct']) / count,
          'top5_accuracy': float(totals['correct5']) / count, 'count': count}


def frozen_paths(params, patterns) -> tuple[str, ...]:
  """'a/b/kernel' paths of the parameters that get no gradient at all."""
  if not patterns:
    return ()
  flat = flax.traverse_util.flatten_dict(optim.frozen_mask(params, tuple(patterns)), sep='/')
  return tuple(sorted(path for path, frozen in flat.items() if frozen))


def _process_slice(global_batch: int) -> tuple[int, int]:
  """This process's rows of every global batch (all rows on a single host)."""
  per_process = global_batch // jax.process_count()
  return jax.process_index() * per_process, (jax.process_index() + 1) * per_process


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (then it saves and exits)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final summary."""
  workdir = pathlib.Path(workdir)
  primary = jax.process_index() == 0
  t_start = time.time()
  mesh = parallel.data_mesh()
  per_device = parallel.check_batch_size(config.train.batch_size, mesh)
  parallel.check_batch_size(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
  dataset = load_data(config)
  model = build_model(config, dataset)
  if primary:
    print(f'devices: {mesh.devices.size} x {jax.devices()[0].platform} on {jax.process_count()} '
          f'host(s); global batch {config.train.batch_size}, {per_device} per device')
    print(f'data: {dataset.name} {len(dataset.x_train)} train / {len(dataset.x_test)} test, '
          f'{dataset.x_train.shape[1:]} images, {dataset.num_classes} classes')

  steps_per_epoch = data.steps_per_epoch(len(dataset.x_train), config.train.batch_size)
  total_steps = config.train.num_steps or steps_per_epoch * config.train.num_epochs
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  variables = train.init_variables(model, dataset.x_train.shape[1:], init_rng)
  variables = transfer.init_from_pretrained(variables, config.transfer, config.model.name)
  tx, schedule = optim.make_optimizer(config.optimizer, config.schedule, steps_per_epoch,
                                      total_steps, variables['params'])
  state = train.create_train_state(model, variables, tx, state_rng)
  frozen = frozen_paths(variables['params'], config.optimizer.frozen)

  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', config.checkpoint)
  state = ckpts.restore_latest(state)
  state = parallel.replicate(state, mesh)
  recipe = make_recipe(config, dataset, frozen)
  records = recorder.Recorder(workdir, enabled=primary)
  start_step = int(state.step)
  if primary and start_step:
    print(f'resumed from step {start_step} in {workdir}')

  history, best = [], {'accuracy': -1.0, 'step': 0}
  lo, hi = _process_slice(config.train.batch_size)
  images_seen, train_seconds, pending = 0, 0.0, []
  eval_every = config.train.eval_every_steps or steps_per_epoch
  progress = _progress_bar(config, total_steps, start_step, primary)
  step = start_step
  with _Preemption() as preemption:
    for step_index, batch in _batches(dataset, config, steps_per_epoch, start_step, total_steps):
      t0 = time.time()
      local = {k: v[lo:hi] for k, v in batch.items()}
      state, metrics = train.jit_train_step(state, parallel.shard_batch(local, mesh), recipe)
      pending.append(metrics)
      step = step_index + 1
      progress.update(1)
      if step % config.train.log_every_steps == 0 or step % eval_every == 0 or step == total_steps:
        summary = _mean_metrics(jax.device_get(pending))  # the one host sync per log interval
        train_seconds += time.time() - t0
        images_seen += config.train.batch_size * len(pending)
        pending = []
        if not math.isfinite(summary['loss']):
          raise TrainingError(f'the loss became {summary["loss"]} at step {step}; lower the '
                              f'learning rate (optimizer.lr) — the last good checkpoint is kept.')
        records.write(step, 'train', {**summary, 'lr': float(schedule(step - 1))})
        progress.set_postfix(loss=f'{summary["loss"]:.3f}', acc=f'{summary["accuracy"]:.3f}',
                             img_s=f'{images_seen / max(train_seconds, 1e-9):.0f}')
      else:
        train_seconds += time.time() - t0
      if step % eval_every == 0 or step == total_steps:
        test = evaluate(state, dataset.x_test, dataset.y_test, config.train.eval_batch_size,
                        recipe, mesh)
        records.write(step, 'test', test)
        history.append({'step': step, **test})
        if test['accuracy'] > best['accuracy']:
          best = {'accuracy': test['accuracy'], 'step': step}
        if primary:
          progress.write(f'step {step}/{total_steps} (epoch {step / steps_per_epoch:.1f}): '
                         f'test loss {test["loss"]:.4f}, accuracy {test["accuracy"]:.2%}')
        ckpts.save(step, state, metrics={'test_accuracy': test['accuracy'],
                                         'test_loss': test['loss']})
      elif config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
        ckpts.save(step, state)
      if preemption.requested:
        ckpts.save(step, state, force=True)
        break
  progress.close()
  ckpts.close()  # waits for asynchronous saves
  records.close()

  wall = time.time() - t_start
  result = {
      'experiment': config.get('experiment', ''), 'steps': step,
      'final_test_accuracy': history[-1]['accuracy'] if history else float('nan'),
      'best_test_accuracy': best['accuracy'], 'best_step': best['step'],
      'wall_seconds': wall, 'train_images_per_second': images_seen / max(train_seconds, 1e-9),
      'preempted': preemption.requested,
  }
  if primary:
    rows = recorder.read_metrics(workdir)
    if rows:
      viz.plot_curves(rows, workdir / 'curves.png')
    print(f"{result['experiment'] or 'run'}: {'preempted at' if preemption.requested else 'finished'} "
          f"step {step}; test accuracy final {result['final_test_accuracy']:.2%}, best "
          f"{best['accuracy']:.2%} (step {best['step']}); {wall:.1f} s wall, "
          f"{result['train_images_per_second']:.0f} train images/s; outputs in {workdir}")
  return result


def _batches(dataset, config, steps_per_epoch, start_step, total_steps):
  """(global step, batch) pairs from `start_step` on, in the order an uninterrupted run sees."""
  step = start_step
  while step < total_steps:
    epoch, in_epoch = divmod(step, steps_per_epoch)
    for batch in data.train_batches(dataset.x_train, dataset.y_train, config.train.batch_size,
                                    seed=config.seed, epoch=epoch, start_step=in_epoch):
      yield step, batch
      step += 1
      if step >= total_steps:
        return


def _mean_metrics(rows: list[dict]) -> dict:
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _progress_bar(config, total, initial, primary):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, file=sys.stdout,
              disable=not (primary and config.train.progress_bar), leave=False)
