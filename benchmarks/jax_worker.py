"""JAX side of the benchmark for one model, in its own process: cnnjax's own train and eval steps.

Measures, for `cnnjax.train.jit_train_step` (SGD with momentum, state donated) and
`jit_eval_step` on a constant uint8 batch already on the device:
* trace+lower and compile time of each step (cold or warm depends on the cache directory the
  orchestrator gives: ``CNNJAX_CACHE_DIR``);
* train and eval throughput (median step time after warm-up);
* train throughput when every batch comes from host memory (``jax.device_put`` per step), to
  check that feeding data is not the bottleneck;
* peak resident memory during training and XLA's own buffer plan for the train step.

Run by bench.py; by hand: ``python benchmarks/jax_worker.py --model lenet5``.
"""
from __future__ import annotations

import argparse
import os
import time

import cnnjax  # first: sets cnnjax's XLA:CPU flags and the compile cache before JAX starts
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import train
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

  if args.host_feed:  # a fresh host batch per step, as the training loop feeds them
    pool = [host_batch(args.model, args.batch, seed=10 + i) for i in range(4)]
    i = 0

    def fed_once():
      nonlocal state, i
      state, metrics = train_c(state, jax.device_put(pool[i % len(pool)]))
      i += 1
      metrics['loss'].block_until_ready()

    result['train_host_fed'] = summarize(
        time_steps(fed_once, args.steps, args.warmup, args.budget), args.batch)
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
  emit(run(p.parse_args(argv)))


if __name__ == '__main__':
  main()
