"""Compare XLA_FLAGS settings on cnnjax's train step: how cnnjax's CPU flags were chosen.

    python benchmarks/flag_sweep.py --model small_resnet --flag= \\
        --flag=--xla_cpu_experimental_ynn_fusion_type=dot \\
        --flag=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution

Each setting runs benchmarks/jax_worker.py in its own process with ``CNNJAX_CPU_FLAGS=0`` (so only
the flags given here apply; an empty ``--flag=`` means XLA's defaults) and its own compile cache; the settings
alternate for ``--rounds`` rounds and the median step time over rounds is reported, with the
loss after the third step (same data and init everywhere) so a flag that changes results
shows up. Re-run it when jaxlib changes:
`cnnjax.runtime` only sets flags for jaxlib versions they were measured on.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile

from bench import run_worker, xla_defaults_env
from common import MODELS


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n'.join(__doc__.splitlines()[1:]))
  p.add_argument('--model', default='small_resnet', choices=sorted(MODELS))
  p.add_argument('--flag', action='append', dest='flags',
                 help='an XLA_FLAGS value to compare, as --flag=VALUE (repeat; empty = XLA defaults)')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--budget', type=float, default=15)
  p.add_argument('--json', default=None)
  a = p.parse_args(argv)
  a.flags = a.flags or ['']
  caches = {f: tempfile.mkdtemp(prefix='cnnjax_sweep_') for f in a.flags}
  runs = {f: [] for f in a.flags}
  try:
    for r in range(a.rounds):
      for flags in a.flags:
        env = xla_defaults_env(CNNJAX_CACHE_DIR=caches[flags])
        env['XLA_FLAGS'] = ' '.join([env['XLA_FLAGS'], flags]).strip()
        out = run_worker('jax_worker.py', ['--model', a.model, '--batch', str(a.batch),
                                           '--steps', str(a.steps), '--budget', str(a.budget)],
                         env, 3600)
        runs[flags].append(out)
        step = out.get('train', {}).get('step_ms', out.get('error'))
        print(f'round {r}: {flags or "(XLA defaults)"}: {step}', file=sys.stderr, flush=True)
  finally:
    for d in caches.values():
      shutil.rmtree(d, ignore_errors=True)
  summary = {}
  for flags, outs in runs.items():
    good = [o for o in outs if 'train' in o]
    if not good:
      summary[flags or '(XLA defaults)'] = {'error': outs[0].get('error')}
      continue
    summary[flags or '(XLA defaults)'] = {
        'train_step_ms_median': round(statistics.median(o['train']['step_ms'] for o in good), 1),
        'train_step_ms_best': round(min(o['train']['best_step_ms'] for o in good), 1),
        'eval_step_ms_median': round(statistics.median(o['eval']['step_ms'] for o in good), 1),
        'compile_cold_s': good[0]['compile_train']['total_s'],
        'losses': good[0]['losses']}
  base = next(iter(summary.values())).get('train_step_ms_median')
  print(f'| XLA_FLAGS ({a.model}, batch {a.batch}) | train step ms (median) | best | speed-up vs '
        'first | eval ms | cold compile s | loss after 3 steps |')
  print('|---|---|---|---|---|---|---|')
  for flags, s in summary.items():
    if 'error' in s:
      print(f'| `{flags}` | error: {s["error"]} |||||')
      continue
    print(f'| `{flags}` | {s["train_step_ms_median"]} | {s["train_step_ms_best"]} | '
          f'{base / s["train_step_ms_median"]:.2f}x | {s["eval_step_ms_median"]} | '
          f'{s["compile_cold_s"]} | {s["losses"][min(2, len(s["losses"]) - 1)]:.6f} |')
  if a.json:
    with open(a.json, 'w') as f:
      json.dump({'model': a.model, 'rounds': a.rounds, 'results': summary}, f, indent=1)


if __name__ == '__main__':
  main()
