"""JAX side of the benchmark for one model, in its own process: cnnjax's own train and eval steps.

Measures, for `cnnjax.train.jit_train_step` (SGD with momentum, state donated) and
`jit_eval_step` on a constant uint8 batch already on the device:
* trace+lower and compile time of each step (cold or warm depends on the cache directory the
  orchestrator gives: ``CNNJAX_CACHE_DIR``);
* train and eval throughput (median step time after warm-up);
* the input pipeline: the training loop as `cnnjax.runner` runs it (steps dispatched back to
  back, no host sync inside the loop) fed by `cnnjax.data.train_batches` from host memory,
  against the same loop on a batch already on the device;
* peak resident memory during training and XLA's own buffer plan for the train step.

Run by bench.py; by hand: ``python benchmarks/jax_worker.py --model lenet5``.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import time

import cnnjax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import data, train
from common import (MODELS, NUM_CLASSES, emit, load_average, peak_rss_mb, reset_peak_rss,
                    summarize, time_steps)


def make_state(name: str, dtype: str, seed: int = 0):
  h, w, c = MODELS[name]
  model = cnnjax.get_model(name, num_classes=NUM_CLASSES, in_channels=c,
                           dtype=jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32)
  key = jax.random.key(seed)
  variables = train.init_variables(model, (h, w, c), key)
  tx = optax.sgd(learning_rate=0.01, momentum=0.9)
  state = train.create_train_state(model, variables, tx, key)
  recipe = train.StepRecipe(mean=(127.5,) * c, std=(64.0,) * c)
  return state, recipe


def host_batch(name: str, batch: int, seed: int) -> dict:
  h, w, c = MODELS[name]
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (batch, h, w, c), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, (batch,), dtype=np.int32)}


def lower_and_compile(jitted, *args, recipe):
  start = time.perf_counter()
  lowered = jitted.lower(*args, recipe=recipe)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return compiled, {'lower_s': round(lowered_at - start, 3), 'compile_s': round(done - lowered_at, 3),
                    'total_s': round(done - start, 3)}


def xla_memory_mb(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
    mb = lambda b: round(b / 2**20, 1)
    return {'temp_mb': mb(m.temp_size_in_bytes), 'argument_mb': mb(m.argument_size_in_bytes),
            'output_mb': mb(m.output_size_in_bytes)}
  except Exception:  # not every backend reports it
    return {}


def measure_feeding(train_c, state, on_device, args) -> dict:
  """Per-step times of the training loop fed from host memory vs from one on-device batch.

  Both loops dispatch ``window`` steps back to back and wait only for the last, as the runner
  does (it syncs once per log interval), so gathering and transferring the next batch overlaps
  the running step. Windows of the two loops alternate, so load on the machine hits both alike.
  Returns {'train_loop_device': ..., 'train_host_fed': ...} (`summarize` dicts per step).
  """
  pool = host_batch(args.model, args.batch * 8, seed=10)  # an 8-batch "dataset" in host memory

  def shuffled_batches():  # the runner's own batching: a new permutation every epoch
    for epoch in itertools.count():
      yield from data.train_batches(pool['image'], pool['label'], args.batch, seed=0, epoch=epoch)

  feed = shuffled_batches()
  sources = {'train_host_fed': lambda: jax.device_put(next(feed)),
             'train_loop_device': lambda: on_device}
  step_s, state = _one_step_s(train_c, state, on_device)
  window = max(3, math.ceil(0.3 / step_s))  # windows of >= 0.3 s: dispatch overhead amortized
  times = {name: [] for name in sources}
  began = time.perf_counter()
  while True:
    for name, next_batch in sources.items():
      start = time.perf_counter()
      for _ in range(window):
        state, metrics = train_c(state, next_batch())
      jax.block_until_ready(metrics['loss'])
      times[name].append((time.perf_counter() - start) / window)
    pairs = len(times['train_host_fed'])
    spent = time.perf_counter() - began
    if pairs >= 3 and (pairs * window >= args.steps or (args.budget and spent >= args.budget)):
      break
  out = {name: summarize(t, args.batch) for name, t in times.items()}
  out['feeding_window_steps'] = window
  out['feeding_probe_step_ms'] = round(1e3 * step_s, 3)
  return out


def _one_step_s(train_c, state, batch):
  """Seconds of one synchronous train step (after a warm-up step), and the new state."""
  for _ in range(2):
    start = time.perf_counter()
    state, metrics = train_c(state, batch)
    jax.block_until_ready(metrics['loss'])
  return time.perf_counter() - start, state


def run(args) -> dict:
  state, recipe = make_state(args.model, args.dtype)
  batch = jax.device_put(host_batch(args.model, args.batch, seed=1))
  result = {'model': args.model, 'dtype': args.dtype, 'batch': args.batch,
            'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
            'xla_flags': os.environ.get('XLA_FLAGS', ''), 'jax': jax.__version__,
            'cache_dir': jax.config.jax_compilation_cache_dir}
  train_c, result['compile_train'] = lower_and_compile(train.jit_train_step, state, batch,
                                                       recipe=recipe)
  eval_c, result['compile_eval'] = lower_and_compile(train.jit_eval_step, state, batch,
                                                     recipe=recipe)
  result['xla_memory_train'] = xla_memory_mb(train_c)
  if args.compile_only:
    return result

  losses = []

  def train_once():
    nonlocal state
    state, metrics = train_c(state, batch)
    losses.append(float(metrics['loss']))  # blocks until the step is done

  reset_peak_rss()
  result['load_average_before'] = load_average()
  result['train'] = summarize(time_steps(train_once, args.steps, args.warmup, args.budget),
                              args.batch)
  result['peak_rss_mb'] = peak_rss_mb()
  result['losses'] = losses[:3] + losses[-1:]

  result['eval'] = summarize(
      time_steps(lambda: jax.block_until_ready(eval_c(state, batch)), args.steps, args.warmup,
                 args.budget),
      args.batch)

  if args.host_feed:
    result.update(measure_feeding(train_c, state, batch, args))
  result['load_average_after'] = load_average()
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', required=True, choices=sorted(MODELS))
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--budget', type=float, default=None, help='seconds per measurement (at least 5 steps)')
  p.add_argument('--compile-only', action='store_true')
  p.add_argument('--host-feed', action='store_true')
  args = p.parse_args(argv)
  cnnjax.configure_cpu()  # cnnjax's XLA:CPU flags and compile cache, before JAX starts a backend
  emit(run(args))


if __name__ == '__main__':
  main()
