"""cnnjax vs PyTorch on this machine, in one run: train/eval throughput, compile time, memory.

    python benchmarks/bench.py                 # the four models, batch 128, float32 (~10 min on 2 cores)
    python benchmarks/bench.py --smoke         # seconds: tiny batch, one model (what CI runs)

For each model it runs, each in a fresh process: cnnjax's train step compiled cold (empty
persistent cache), then again with that cache warm plus the throughput, eval and memory
measurements (benchmarks/jax_worker.py); PyTorch eager and channels_last (benchmarks/torch_worker.py,
skipped when torch is not installed); optionally JAX with XLA's default flags (``--xla-defaults``).
Then, per model, the train steps alternated step by step in one process (``onednn_conv.py``'s
interleaved part: cnnjax float32 and bfloat16 against PyTorch's fastest configuration of the
same precision, the ratio the speed targets are judged on; ``--no-interleaved`` skips it), and the
dense-vs-conv profile (benchmarks/dense_vs_conv.py). It prints Markdown tables and
writes everything as JSON. ``--repeat N`` alternates the throughput runs N times and keeps the
median, which matters on a busy machine.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import MODELS, parse  # noqa: E402
import report  # noqa: E402


def _cnnjax_flag_names() -> set[str]:
  """Names of the XLA flags `import cnnjax` adds (runtime.py loaded alone: no JAX start-up)."""
  spec = importlib.util.spec_from_file_location('_cnnjax_runtime', ROOT / 'cnnjax' / 'runtime.py')
  runtime = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(runtime)
  return set(runtime.cpu_flags())


def xla_defaults_env(**extra: str) -> dict:
  """A worker environment without cnnjax's XLA flags, even if this process already has them."""
  names = _cnnjax_flag_names()
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if f.lstrip('-').split('=', 1)[0] not in names]
  return worker_env(XLA_FLAGS=' '.join(flags), CNNJAX_CPU_FLAGS='0', **extra)


def worker_env(**extra: str) -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), *filter(None, [env.get('PYTHONPATH')])])
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # the orchestrator chooses the cache (cold/warm)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  env.update(extra)
  return env


def run_worker(script: str, args: list[str], env: dict, timeout: float) -> dict:
  cmd = [sys.executable, str(HERE / script), *args]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:.0f} s: {" ".join(cmd[1:])}'}
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-5:]
    return {'error': f'{script} exited with {proc.returncode}: ' + ' | '.join(tail)}
  result = parse(proc.stdout)
  result['wall_s'] = round(time.perf_counter() - start, 1)
  return result


TIMED = (('train',), ('eval',), ('train_host_fed',), ('train_loop_device',), ('eager', 'train'), ('eager', 'eval'),
         ('channels_last', 'train'), ('channels_last', 'eval'))


def _get(node, path):
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node


def median_runs(runs: list[dict]) -> dict:
  """The first good run, with every timing replaced by the median over all good runs."""
  good = [r for r in runs if 'error' not in r]
  if not good:
    return runs[0]
  merged = copy.deepcopy(good[0])
  for path in TIMED:
    nodes = [n for n in (_get(r, path) for r in good) if n]
    if nodes:
      step = statistics.median(n['step_ms'] for n in nodes)
      _get(merged, path).update(
          step_ms=round(step, 3), images_per_s=round(1e3 * nodes[0]['batch'] / step, 1),
          best_step_ms=min(n['best_step_ms'] for n in nodes), runs=len(nodes))
  return merged


def bench_model(name: str, a, torch_ok: bool) -> dict:
  common = ['--model', name, '--batch', str(a.batch), '--steps', str(a.steps),
            '--warmup', str(a.warmup), '--budget', str(a.budget)]
  jax_args = common + ['--dtype', a.dtype]
  cache = tempfile.mkdtemp(prefix=f'cnnjax_bench_{name}_')
  default_cache = tempfile.mkdtemp(prefix=f'cnnjax_bench_{name}_xla_')
  try:
    env = worker_env(CNNJAX_CACHE_DIR=cache)
    out = {'input_shape': list(MODELS[name]),
           'jax_cold': run_worker('jax_worker.py', jax_args + ['--compile-only'], env, a.timeout)}
    jax_runs, default_runs, torch_runs = [], [], []
    for _ in range(a.repeat):
      jax_runs.append(run_worker('jax_worker.py', jax_args + ['--host-feed'], env, a.timeout))
      if a.xla_defaults:
        default_runs.append(run_worker(
            'jax_worker.py', jax_args,
            xla_defaults_env(CNNJAX_CACHE_DIR=default_cache), a.timeout))
      if torch_ok:
        torch_runs.append(run_worker('torch_worker.py', common + ['--threads', str(a.threads)],
                                     worker_env(), a.timeout))
    out['jax'] = median_runs(jax_runs)
    if default_runs:
      out['jax_xla_defaults'] = median_runs(default_runs)
    if torch_runs:
      out['torch'] = median_runs(torch_runs)
    return out
  finally:
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(default_cache, ignore_errors=True)


def versions() -> dict:
  out = {'python': platform.python_version()}
  for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'torchvision'):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def machine() -> dict:
  info = {'platform': platform.platform(), 'cpu_count': os.cpu_count()}
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text()
    info['cpu'] = next(l.split(':', 1)[1].strip() for l in text.splitlines()
                       if l.startswith('model name'))
    flags = next(l for l in text.splitlines() if l.startswith('flags')).split()
    info['isa'] = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
    mem = pathlib.Path('/proc/meminfo').read_text().split()[1]
    info['memory_gib'] = round(int(mem) / 2**20, 1)
  except (OSError, StopIteration, IndexError):
    pass
  return info


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n'.join(__doc__.splitlines()[1:]))
  p.add_argument('--models', default=','.join(MODELS),
                 help=f'comma-separated, from: {", ".join(MODELS)}')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=30, help='most timed steps per measurement')
  p.add_argument('--budget', type=float, default=20,
                 help='seconds per measurement: stop timing early after this (at least 5 steps)')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps after compiling')
  p.add_argument('--repeat', type=int, default=1, help='alternating runs; medians are reported')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='compute dtype of the cnnjax models (PyTorch stays float32)')
  p.add_argument('--threads', type=int, default=os.cpu_count(), help='PyTorch threads')
  p.add_argument('--xla-defaults', action='store_true',
                 help="also run JAX with XLA's default flags (CNNJAX_CPU_FLAGS=0)")
  p.add_argument('--no-torch', action='store_true', help='skip PyTorch')
  p.add_argument('--no-dense-vs-conv', action='store_true')
  p.add_argument('--no-interleaved', action='store_true',
                 help='skip the train steps alternated in one process')
  p.add_argument('--interleaved-steps', type=int, default=5,
                 help='rounds of the alternated train steps (medians are reported)')
  p.add_argument('--smoke', action='store_true',
                 help='tiny and fast: lenet5, batch 8, 2 steps, with --xla-defaults (checks the benchmark runs)')
  p.add_argument('--json', default=None,
                 help='output file (default: benchmarks/results.json; smoke: a temp file)')
  p.add_argument('--timeout', type=float, default=1800, help='seconds per worker process')
  a = p.parse_args(argv)
  if a.smoke:
    a.models, a.batch, a.steps, a.warmup, a.repeat, a.budget = 'lenet5', 8, 2, 1, 1, 5
    a.xla_defaults = True  # cheap here, and it checks cnnjax's flags keep the numerics
  a.models = [m.strip() for m in a.models.split(',') if m.strip()]
  unknown = [m for m in a.models if m not in MODELS]
  if unknown:
    p.error(f'unknown model(s) {", ".join(unknown)}; choose from {", ".join(MODELS)}')
  if min(a.batch, a.steps, a.repeat) < 1 or a.warmup < 0:
    p.error('--batch, --steps and --repeat must be at least 1 and --warmup at least 0')
  if a.json is None:
    a.json = (os.path.join(tempfile.gettempdir(), 'cnnjax_bench_smoke.json') if a.smoke
              else str(HERE / 'results.json'))
  return a


def main(argv=None) -> int:
  a = parse_args(argv)
  torch_ok = not a.no_torch and importlib.util.find_spec('torch') is not None
  started = time.perf_counter()
  results = {'command': ' '.join(['python', 'benchmarks/bench.py', *(argv or sys.argv[1:])]),
             'machine': machine(), 'versions': versions(),
             'config': {k: getattr(a, k) for k in ('models', 'batch', 'steps', 'budget', 'warmup',
                                                   'repeat', 'dtype', 'threads', 'smoke')},
             'torch_available': torch_ok, 'models': {}}
  for name in a.models:
    print(f'[bench] {name} ...', file=sys.stderr, flush=True)
    results['models'][name] = bench_model(name, a, torch_ok)
  if torch_ok and not a.no_interleaved:
    results['interleaved'] = {}
    for name in a.models:
      print(f'[bench] {name}, train steps alternated in one process ...', file=sys.stderr,
            flush=True)
      results['interleaved'][name] = run_worker(
          'onednn_conv.py', ['--interleaved-worker', '--model', name, '--batch', str(a.batch),
                             '--steps', str(1 if a.smoke else a.interleaved_steps),
                             '--precisions', 'float32,bfloat16'], worker_env(), a.timeout)
  if not a.no_dense_vs_conv:
    print('[bench] dense vs conv ...', file=sys.stderr, flush=True)
    dvc_args = (['--batch', '2', '--steps', '1', '--warmup', '0'] if a.smoke else [])
    results['dense_vs_conv'] = {'jax': run_worker('dense_vs_conv.py', ['--framework', 'jax', *dvc_args],
                                                  worker_env(), a.timeout)}
    if torch_ok:
      results['dense_vs_conv']['torch'] = run_worker(
          'dense_vs_conv.py', ['--framework', 'torch', '--threads', str(a.threads), *dvc_args],
          worker_env(), a.timeout)
  results['targets'] = report.targets(results)
  results['wall_s'] = round(time.perf_counter() - started, 1)
  pathlib.Path(a.json).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.json).write_text(json.dumps(results, indent=1) + '\n')
  print(report.markdown(results))
  print(f'\nJSON: {a.json}  ({results["wall_s"]} s)')
  failed = [n for n, m in results['models'].items() if 'error' in m.get('jax', {'error': 1})]
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
