"""XLA:CPU options for cnnjax's train and eval steps, compared call by call in one process.

    L=LIBRARY_FUSION_TYPE_
    python benchmarks/step_options.py --model small_resnet --batch 32 --value= \\
        --value=${L}DOT,${L}INDIVIDUAL_DOT,${L}REDUCE --value=${L}INDIVIDUAL_DOT,${L}DOT

Each ``--value`` is a setting of ``--option`` (default ``xla_cpu_experimental_ynn_fusion_type``)
given to XLA per compilation (``jax.jit(..., compiler_options=...)``; the same debug option the
flag in ``XLA_FLAGS`` sets, but with full enum names only: no ``-name`` shorthand, so
``-individual_convolution`` is the default list without it, as above); an empty value compiles
with the process's flags (``configure_cpu()`` is not called here, so those are XLA's defaults
unless you set ``XLA_FLAGS``). Every setting gets its own compiled train step (SGD with momentum, its own copy
of the state) and eval step; then the calls alternate setting by setting for ``--rounds``
rounds, so load from other processes hits all settings alike. Reported per setting: the median
and best step, the median over rounds of its step time divided by the first setting's in the
same round (paired, so slow phases of the machine cancel), and the loss after three steps.
`benchmarks/flag_sweep.py` compares whole ``XLA_FLAGS`` strings in separate processes instead.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

from cnnjax import train
from common import MODELS
from jax_worker import host_batch, make_state


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n'.join(__doc__.splitlines()[1:]))
  p.add_argument('--model', default='small_resnet', choices=sorted(MODELS))
  p.add_argument('--option', default='xla_cpu_experimental_ynn_fusion_type')
  p.add_argument('--value', action='append', dest='values',
                 help='a value of --option to compare (repeat; empty = the process flags)')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--rounds', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  a = p.parse_args(argv)
  values = a.values or ['']
  state0, recipe = make_state(a.model, 'float32')
  batch = jax.device_put(host_batch(a.model, a.batch, seed=1))
  steps, states, losses = {}, {}, {}
  for v in values:
    options = {a.option: v} if v else None
    tr = jax.jit(train.train_step, static_argnames='recipe', donate_argnames='state',
                 compiler_options=options).lower(state0, batch, recipe=recipe).compile()
    ev = jax.jit(train.eval_step, static_argnames='recipe',
                 compiler_options=options).lower(state0, batch, recipe=recipe).compile()
    steps[v], states[v], losses[v] = (tr, ev), jax.tree.map(lambda x: x.copy(), state0), []
    for _ in range(a.warmup):
      states[v], metrics = tr(states[v], batch)
      losses[v].append(float(metrics['loss']))
      jax.block_until_ready(ev(states[v], batch))
  times = {(v, kind): [] for v in values for kind in ('train', 'eval')}
  for r in range(a.rounds):
    for v in values:
      tr, ev = steps[v]
      t, (states[v], _) = _timed(lambda: tr(states[v], batch))
      times[v, 'train'].append(t)
      times[v, 'eval'].append(_timed(lambda: ev(states[v], batch))[0])
    print(f'round {r}: ' + ', '.join(f'{v or "(flags)"} {1e3 * times[v, "train"][-1]:.0f}'
                                     for v in values), file=sys.stderr, flush=True)
  first = values[0]
  print(f'| {a.option} ({a.model}, batch {a.batch}, {a.rounds} rounds) | train ms median | best '
        f'| train time / first (paired median) | eval ms median | best | eval time / first '
        '(paired median) | loss after 3 steps |')
  print('|---|---|---|---|---|---|---|---|')
  for v in values:
    cells = []
    for kind in ('train', 'eval'):
      t, base = times[v, kind], times[first, kind]
      paired = statistics.median(x / y for x, y in zip(t, base))
      cells += [f'{1e3 * statistics.median(t):.1f}', f'{1e3 * min(t):.1f}', f'{paired:.2f}']
    print(f'| `{v or "(process flags)"}` | ' + ' | '.join(cells) + f' | {losses[v][-1]:.6f} |')


if __name__ == '__main__':
  main()
