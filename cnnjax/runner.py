"""The training loop: config -> data -> model and state -> compiled steps -> metrics and checkpoints.

`run(config, workdir)` is what `python run.py` calls, and what a notebook or a test calls. Data
flows one way; the loop only feeds batches to `train.train_step` and records what comes back.
Rerunning with the same workdir resumes from the newest valid checkpoint, with the same data
order and random keys as an uninterrupted run (both are derived from the step number).
"""
from __future__ import annotations

import contextlib
import math
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import (checkpoint, data, ema, freezing, models, optim, parallel, progress, recorder,
                    train, transfer, viz)
from cnnjax import workdir_lock
from cnnjax.data import augment
from cnnjax.data import loader as data_loader
from cnnjax.data import stream as data_stream
from cnnjax.errors import ConfigError
from cnnjax.errors import TrainingError  # noqa: F401  (re-exported: raised here)



def build_model(config: ml_collections.ConfigDict, dataset: data.Dataset,
                bn_axis_name: str | None = None):
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}.get(config.model.dtype)
  if dtype is None:
    raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got '{config.model.dtype}'.")
  # Under pmap, BatchNorm averages its statistics over the axis: only models with BatchNorm
  # take the option (LeNet-5, AlexNet and the tutorial net have none).
  if bn_axis_name and 'bn_axis_name' in models.model_options(config.model.name):
    axis = {'bn_axis_name': bn_axis_name}
  else:
    axis = {}
  return models.get_model(config.model.name, num_classes=dataset.num_classes,
                          in_channels=dataset.image_shape[-1], dtype=dtype, **axis,
                          **config.model.kwargs.to_dict())


def load_data(config: ml_collections.ConfigDict) -> data.Dataset | data_stream.Stream:
  """The whole dataset in memory (the fast path), or a Stream read batch by batch
  (`data.pipeline`, `data.image_size`: see cnnjax/data/stream.py)."""
  if data_stream.use_stream(config.data):
    return data_stream.open_stream(config.data, jax.process_index(), jax.process_count())
  dataset = data.load_dataset(config.data.name, data_dir=config.data.data_dir or None)
  if config.data.classes:
    dataset = dataset.select_classes(tuple(config.data.classes))
  return dataset


def init_from_data(model, variables: dict, dataset: data.Dataset) -> dict:
  """Data-dependent initialization of a new run, for models that define
  `init_from_data(variables, images, mean, std)` (airbench94's whitening conv); else unchanged."""
  init = getattr(model, 'init_from_data', None)
  if init is None:
    return variables
  images = dataset.sample_images() if isinstance(dataset, data_stream.Stream) else dataset.x_train
  return init(variables, images, dataset.mean, dataset.std)


def make_recipe(config: ml_collections.ConfigDict, dataset: data.Dataset,
                frozen: tuple[str, ...] = (), axis_name: str | None = None) -> train.StepRecipe:
  return train.StepRecipe(
      mean=tuple(dataset.mean), std=tuple(dataset.std), crop_padding=config.data.crop_padding,
      pad_mode=config.data.pad_mode,
      flip=config.data.flip and not getattr(dataset, 'flips_on_host', False),
      label_smoothing=config.train.label_smoothing, eval_flip_tta=config.train.eval_flip_tta,
      frozen=frozen, axis_name=axis_name, accumulate_steps=config.train.accumulate_steps,
      ema_decay=config.train.ema_decay, ema_warmup_power=config.train.ema_warmup_power,
      aux_loss_weight=config.train.aux_loss_weight,
      **augment.recipe_fields(config.data, dataset.num_classes))


def evaluate(state: train.TrainState, x: np.ndarray, y: np.ndarray, batch_size: int,
             recipe: train.StepRecipe, strategy: parallel.DataParallel) -> dict:
  """Loss, top-1 and top-5 accuracy over every example of (x, y) exactly once.

  `batch_size` need not divide over the devices: it is rounded up to a multiple of them (and of
  the processes), the last batch is padded, and padded rows are masked out of every sum.
  """
  batch_size = strategy.eval_batch_size(batch_size, len(x))
  rows = parallel.process_rows(batch_size)
  return evaluate_batches(state, ({k: v[rows] for k, v in batch.items()}
                                  for batch in data.eval_batches(x, y, batch_size)),
                          recipe, strategy)


def evaluate_batches(state: train.TrainState, local_batches, recipe: train.StepRecipe,
                     strategy: parallel.DataParallel) -> dict:
  """`evaluate` over this process's rows of every eval batch (masked), e.g. a Stream's."""
  totals = None
  for local in local_batches:
    sums = strategy.eval_step(state, strategy.put_batch(local), recipe)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'accuracy': float(totals['correct']) / count,
          'top5_accuracy': float(totals['correct5']) / count, 'count': count}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Value checks the types of a ConfigDict cannot express (types are checked on assignment)."""
  for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'accumulate_steps'):
    if config.train[key] <= 0:
      raise ConfigError(f'train.{key} must be a positive integer, got {config.train[key]}.')
  for key in ('num_epochs', 'num_steps', 'eval_every_steps', 'aux_loss_weight'):
    if config.train[key] < 0:
      raise ConfigError(f'train.{key} must be >= 0, got {config.train[key]}.')
  if not config.train.num_epochs and not config.train.num_steps:
    raise ConfigError('set train.num_epochs or train.num_steps to a positive number.')
  ema.check(config.train.ema_decay, config.train.ema_warmup_power)


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
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final summary.

  One run at a time per workdir: raises WorkdirBusyError, changing nothing, while another live
  run holds it (cnnjax/workdir_lock.py).
  """
  workdir = pathlib.Path(workdir)
  check_config(config)
  parallel.initialize_distributed(config.parallel.coordinator_address,
                                  config.parallel.num_processes, config.parallel.process_id)
  with workdir_lock.hold(workdir):  # a second run in this workdir refuses here, touching nothing
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  primary = jax.process_index() == 0
  t_start = time.time()
  strategy = parallel.DataParallel.create(config.parallel.mode)
  mesh = strategy.mesh
  per_device = parallel.check_batch_size(config.train.batch_size, mesh)  # eval batches: padded
  train.check_micro_batches(per_device, config.train.accumulate_steps, strategy.num_devices)
  dataset = load_data(config)
  model = build_model(config, dataset, strategy.axis_name)
  if primary:
    k = config.train.accumulate_steps
    print(strategy.describe(config.train.batch_size) +
          (f', in {k} micro-batches of {per_device // k}' if k > 1 else ''))
    print(dataset.describe() if isinstance(dataset, data_stream.Stream) else
          f'data: {dataset.name} {dataset.num_train} train / {dataset.num_test} test, '
          f'{dataset.image_shape} images, {dataset.num_classes} classes')

  steps_per_epoch = data.steps_per_epoch(dataset.num_train, config.train.batch_size)
  total_steps = config.train.num_steps or steps_per_epoch * config.train.num_epochs
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', config.checkpoint, steps_per_epoch)
  # Start-up order: resume from this workdir, else initialize from pretrained, else from scratch.
  variables = train.init_variables(model, dataset.image_shape, init_rng)
  if not ckpts.all_steps():
    variables = init_from_data(model, variables, dataset)
    variables = transfer.init_from_pretrained(variables, config.transfer, config.model.name)
  tx, schedule = optim.make_optimizer(config.optimizer, config.schedule, steps_per_epoch,
                                      total_steps, variables['params'])
  state = train.create_train_state(model, variables, tx, state_rng,
                                   ema=config.train.ema_decay > 0)
  state = ckpts.restore_latest(state)
  feed = {'data': ckpts.data_state}  # a stream's loader state: saved with each checkpoint
  state = strategy.put_state(state)
  start_step = int(state.step)
  unfreeze_at = freezing.unfreeze_step(config.optimizer, steps_per_epoch)
  recipe = make_recipe(config, dataset, freezing.untrained_paths(
      config.optimizer, variables['params'], start_step, steps_per_epoch), strategy.axis_name)
  records = recorder.Recorder(workdir, enabled=primary)
  if primary and start_step:
    print(f'resumed from step {start_step} in {workdir}')

  history = {}  # this run's evaluations: {step: {'test_loss': ..., 'test_accuracy': ...}}
  eval_every = config.train.eval_every_steps or steps_per_epoch
  bar = progress.progress_bar(config, total_steps, start_step, primary)
  throughput = progress.Throughput(config.train.batch_size)
  pending, step = [], start_step

  def test_metrics(state):
    if isinstance(dataset, data_stream.Stream):  # one Batches per run, rewound: workers stay
      if 'eval' not in feed:
        feed['eval'] = feeds.enter_context(dataset.eval_batches(strategy.eval_batch_size(
            config.train.eval_batch_size, dataset.num_test)))
      feed['eval'].rewind()
      return evaluate_batches(state, feed['eval'], recipe, strategy)
    return evaluate(state, dataset.x_test, dataset.y_test, config.train.eval_batch_size,
                    recipe, strategy)

  def run_evaluation(state, recipe, step, record=True):
    """The trained weights as split 'test'; with an EMA, its weights as 'test_ema' too."""
    tests = {'test': test_metrics(state)}
    if state.ema is not None:
      tests['test_ema'] = test_metrics(ema.swap_in(state))
    history[step] = {name: value for split, test in tests.items()
                     for name, value in recorder.named_test_metrics(test, split).items()}
    for split, test in tests.items():
      if record:
        records.write(step, split, test)
      if primary:
        bar.write(f'step {step}/{total_steps} (epoch {step / steps_per_epoch:.1f}): '
                  f'{split.replace("_", " ")} loss {test["loss"]:.4f}, accuracy '
                  f'{test["accuracy"]:.2%}')
    return history[step]

  def evaluation_step(step):
    return step % eval_every == 0 or step == total_steps

  # Closing order on any exit: the progress bar, the records, then the checkpoints (waiting for
  # the save in flight, whose failure is one TrainingError), then the SIGTERM handler.
  with _Preemption() as preemption, ckpts, records, bar, contextlib.ExitStack() as feeds:
    if start_step and evaluation_step(start_step) and start_step not in ckpts.evaluations():
      run_evaluation(state, recipe, start_step)  # the one a preemption skipped (see below)
    for step_index, batch in _batches(dataset, config, steps_per_epoch, start_step, total_steps,
                                      strategy, feed, feeds):
      if step_index == unfreeze_at:  # gradual unfreezing: the step now differentiates everything
        recipe = make_recipe(config, dataset, freezing.untrained_paths(
            config.optimizer, variables['params'], step_index, steps_per_epoch), strategy.axis_name)
      state, metrics = strategy.train_step(state, batch, recipe)
      pending.append(metrics)
      step = step_index + 1
      bar.update(1)
      if step % config.train.log_every_steps == 0 or step % eval_every == 0 or step == total_steps:
        summary = progress.mean_metrics(jax.device_get(pending))  # the one host sync per log interval
        throughput.count(len(pending))
        pending = []
        if not math.isfinite(summary['loss']):
          raise TrainingError(f'the loss became {summary["loss"]} at step {step}; lower the '
                              f'learning rate (optimizer.lr) — the last good checkpoint is kept.')
        records.write(step, 'train', {**summary, 'lr': float(schedule(step - 1))})
        rate = throughput.images_per_second()
        bar.set_postfix(loss=f'{summary["loss"]:.3f}', acc=f'{summary["accuracy"]:.3f}',
                             **({'img_s': f'{rate:.0f}'} if rate else {}))
      # A preemption skips the evaluation (the grace period is for saving); the resumed run
      # evaluates that step first.
      if evaluation_step(step) and not preemption.requested:
        with throughput.paused():
          ckpts.save(step, state, metrics=run_evaluation(state, recipe, step),
                     data=feed['data'])
      elif config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
        with throughput.paused():
          ckpts.save(step, state, data=feed['data'])
      if preemption.requested:
        ckpts.save(step, state, force=True, data=feed['data'])
        break
    if step == total_steps and not history and not preemption.requested:
      # A finished run was rerun: evaluate what is there (recorded when it was first evaluated).
      run_evaluation(state, recipe, step, record=False)
    bar.close()
    ckpts.close()  # waits for the asynchronous saves: their metrics are read next
    evaluations = {**ckpts.evaluations(), **history}
    preempted = preemption.requested and not (step == total_steps and step in history)

  result = recorder.summarize(
      step, evaluations, ckpts.best_metric, checkpoint.minimizes(ckpts.best_metric), preempted,
      train_steps=step - start_step, images_per_second=throughput.images_per_second(),
      experiment=config.get('experiment', ''), wall_seconds=time.time() - t_start)
  if primary:
    metric_rows = recorder.read_metrics(workdir)
    if metric_rows:
      viz.plot_curves(metric_rows, workdir / 'curves.png')
    print(recorder.summary_line(result, workdir))
  return result


def _batches(dataset, config, steps_per_epoch, start_step, total_steps, strategy, feed, feeds):
  """(global step, this process's rows of the batch on the devices) from `start_step` on, in
  the order an uninterrupted run sees. A Stream's batches come from its loader (resumed from
  `feed['data']`, and `feed['data']` is kept at the state after the batch last yielded)."""
  if start_step >= total_steps:
    return
  if isinstance(dataset, data_stream.Stream):
    batches = feeds.enter_context(dataset.train_batches(
        config.train.batch_size, steps_per_epoch, config.seed, start_step, total_steps,
        state=feed['data']))
    for step, (batch, feed['data']) in enumerate(data_loader.ahead(batches, strategy.put_batch),
                                                 start_step):
      yield step, batch
    return
  rows = parallel.process_rows(config.train.batch_size)
  step = start_step
  while step < total_steps:
    epoch, in_epoch = divmod(step, steps_per_epoch)
    for batch in data.train_batches(dataset.x_train, dataset.y_train, config.train.batch_size,
                                    seed=config.seed, epoch=epoch, start_step=in_epoch):
      yield step, strategy.put_batch({k: v[rows] for k, v in batch.items()})
      step += 1
      if step >= total_steps:
        return
