"""oneDNN convolutions (cnnjax.kernels) against XLA's, and the train step they give against PyTorch.

    python benchmarks/onednn_conv.py            # all three parts below (~10 min on 2 busy cores)
    python benchmarks/onednn_conv.py --parts convs --repeat 5
    python benchmarks/onednn_conv.py --smoke    # seconds: tiny shapes, one repeat

Parts (``--parts``, comma-separated):
* ``convs``: per convolution of small_resnet at batch 128 (NHWC), the forward and the training
  pass (forward + input and kernel gradients), XLA vs oneDNN, float32 and bfloat16, in one process
  with cnnjax's XLA:CPU flags; ``--repeat`` alternates the two and keeps each one's best.
* ``steps``: small_resnet's train step (benchmarks/jax_worker.py, batch 128) with the kernels
  (``CNNJAX_ONEDNN=1``) and without (``CNNJAX_ONEDNN=0``), float32 and bfloat16, beside PyTorch
  eager and channels_last float32 (benchmarks/torch_worker.py) and channels_last + ``torch.autocast('cpu',
  torch.bfloat16)`` (here), each a fresh process, alternated ``--repeat`` times (medians).
* ``kernels``: which oneDNN implementations ran in one bfloat16 and one float32 train step
  (``ONEDNN_VERBOSE=1``), and the instruction set oneDNN dispatches to.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import emit, load_average, parse  # noqa: E402

# small_resnet's convolutions at batch 128: (name, H=W, in, out, kernel, stride, padding)
CONVS = [('stem 3x3 3->64', 32, 3, 64, 3, 1, 1), ('3x3 64->64 @32', 32, 64, 64, 3, 1, 1),
         ('3x3 s2 64->128 @32', 32, 64, 128, 3, 2, 1), ('3x3 128->128 @16', 16, 128, 128, 3, 1, 1),
         ('1x1 s2 64->128 @32', 32, 64, 128, 1, 2, 0), ('3x3 256->256 @8', 8, 256, 256, 3, 1, 1)]


def _env(**extra) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  env['PYTHONPATH'] = os.pathsep.join([str(HERE.parent), *filter(None, [env.get('PYTHONPATH')])])
  env.update(extra)
  return env


def _run(args: list[str], env: dict, timeout: float = 900) -> dict:
  try:
    proc = subprocess.run([sys.executable, *args], env=env, cwd=HERE.parent,
                          capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:.0f} s'}
  if proc.returncode:
    return {'error': ' | '.join(proc.stderr.strip().splitlines()[-3:])}
  return parse(proc.stdout)


# ------------------------------------------------------------------------------------- convs
def conv_table(batch: int, repeat: int, smoke: bool) -> list[dict]:
  import cnnjax
  cnnjax.configure_cpu()
  import jax
  import jax.numpy as jnp
  from cnnjax import kernels, layers

  rows = []
  for name, hw, cin, cout, k, s, p in (CONVS[1:2] if smoke else CONVS):
    conv = layers.Conv2d(cout, k, stride=s, padding=p, use_bias=False)
    x32 = jax.random.normal(jax.random.key(0), (batch, hw, hw, cin))
    variables = conv.init(jax.random.key(1), x32[:1])
    flops = 2 * batch * (hw // s) ** 2 * cout * cin * k * k
    for dtype in (jnp.float32, jnp.bfloat16):
      x = x32.astype(dtype)
      fns = {}
      for backend in ('xla', 'onednn'):
        with kernels.use_onednn(backend == 'onednn'):
          fwd = jax.jit(lambda v, x: conv.apply(v, x)).lower(variables, x).compile()
          train = jax.jit(jax.grad(lambda v, x: jnp.sum(conv.apply(v, x).astype(jnp.float32)),
                                   argnums=(0, 1))).lower(variables, x).compile()
        fns[backend] = {'forward': fwd, 'train': train}
      best = collections.defaultdict(lambda: float('inf'))
      for _ in range(repeat):   # alternate the backends: load hits both alike
        for backend, passes in fns.items():
          for kind, fn in passes.items():
            jax.block_until_ready(fn(variables, x))
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, x))
            best[backend, kind] = min(best[backend, kind], time.perf_counter() - start)
      for kind, factor in (('forward', 1), ('train', 3)):
        rows.append({'conv': name, 'dtype': jnp.dtype(dtype).name, 'pass': kind,
                     **{f'{b}_ms': round(1e3 * best[b, kind], 2) for b in fns},
                     **{f'{b}_gflops': round(factor * flops / best[b, kind] / 1e9, 1) for b in fns}})
  return rows


# ------------------------------------------------------------------------------------- steps
def torch_autocast_worker(model: str, batch: int, steps: int, budget: float) -> dict:
  """PyTorch channels_last + autocast bfloat16 train step (torch_worker.py's models and loop)."""
  import torch
  import torch.nn.functional as F
  from common import MODELS, NUM_CLASSES, summarize, time_steps
  from torch_worker import BUILDERS
  torch.manual_seed(0)
  h, w, c = MODELS[model]
  net = BUILDERS[model](in_channels=c, num_classes=NUM_CLASSES).to(memory_format=torch.channels_last)
  images = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8).contiguous(
      memory_format=torch.channels_last)
  labels = torch.randint(0, NUM_CLASSES, (batch,))
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

  def train_once():
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
      loss = F.cross_entropy(net((images.float() - 127.5) / 64.0), labels)
    loss.backward()
    opt.step()
    loss.item()
  return {'train': summarize(time_steps(train_once, steps, 3, budget), batch)}


def step_table(model: str, batch: int, repeat: int, steps: int, budget: float,
               only: str | None = None) -> dict:
  common = ['--model', model, '--batch', str(batch), '--steps', str(steps), '--budget', str(budget)]
  configs = {
      'cnnjax float32, oneDNN': (['benchmarks/jax_worker.py', *common], {'CNNJAX_ONEDNN': '1'}),
      'cnnjax float32, XLA': (['benchmarks/jax_worker.py', *common], {'CNNJAX_ONEDNN': '0'}),
      'cnnjax bfloat16, oneDNN': (['benchmarks/jax_worker.py', *common, '--dtype', 'bfloat16'],
                                  {'CNNJAX_ONEDNN': '1'}),
      'cnnjax bfloat16, XLA': (['benchmarks/jax_worker.py', *common, '--dtype', 'bfloat16'],
                               {'CNNJAX_ONEDNN': '0'}),
      'PyTorch eager / channels_last float32': (['benchmarks/torch_worker.py', *common], {}),
      'PyTorch channels_last + autocast bfloat16': (
          [__file__, '--torch-autocast-worker', *common], {}),
  }
  if only:   # e.g. 'float32': the configurations whose label contains one of these words
    configs = {k: v for k, v in configs.items() if any(w in k for w in only.split(','))}
  rates = collections.defaultdict(list)
  for _ in range(repeat):
    for label, (args, extra) in configs.items():
      r = _run(args, _env(**extra))
      if 'error' in r:
        rates[label + ' (error)'].append(r['error'])
        continue
      for layout in ('eager', 'channels_last'):
        if layout in r:
          rates[label.replace('eager / channels_last', layout)].append(r[layout]['train']['images_per_s'])
      if 'train' in r:
        rates[label].append(r['train']['images_per_s'])
      if 'compile_train' in r:   # trace + lower + compile of the train step (cache as configured)
        rates[label + ': compile s'].append(r['compile_train']['total_s'])
  return {k: (statistics.median(v) if all(isinstance(x, float) for x in v) else v)
          for k, v in rates.items()}


# ----------------------------------------------------------------------------------- kernels
_VERBOSE_STEP = '''
import cnnjax, jax, sys
cnnjax.configure_cpu()
sys.path.insert(0, "benchmarks")
from jax_worker import make_state, host_batch
from cnnjax import kernels, train
state, recipe = make_state(sys.argv[1], sys.argv[2])
batch = jax.device_put(host_batch(sys.argv[1], int(sys.argv[3]), seed=1))
step = train.jit_train_step.lower(state, batch, recipe=recipe).compile()
state, metrics = step(state, batch)   # the state is donated: carry it on
jax.block_until_ready(metrics)
print("ONEDNN_VERBOSE_STEP_START", flush=True)
state, metrics = step(state, batch)
jax.block_until_ready(metrics)
print("RESULT " + __import__("json").dumps(kernels.backend()), flush=True)
'''


def kernels_used(model: str, batch: int) -> dict:
  out = {}
  for dtype in ('float32', 'bfloat16'):
    proc = subprocess.run([sys.executable, '-c', _VERBOSE_STEP, model, dtype, str(batch)],
                          env=_env(ONEDNN_VERBOSE='1', CNNJAX_ONEDNN='1'), cwd=HERE.parent,
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.split('ONEDNN_VERBOSE_STEP_START', 1)[-1].splitlines()
    used = collections.Counter()
    for line in lines:
      f = line.split(',')
      if line.startswith('onednn_verbose,exec,cpu,') and len(f) > 6:
        used[f'{f[3]} {f[5]} {f[4]}'] += 1     # primitive, pass, implementation
    out[dtype] = {'backend': parse(proc.stdout) if 'RESULT' in proc.stdout else proc.stderr[-500:],
                  'executed': dict(sorted(used.items()))}
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--parts', default='convs,steps,kernels')
  p.add_argument('--model', default='small_resnet')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--repeat', type=int, default=3)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--budget', type=float, default=20.0)
  p.add_argument('--only', default=None,
                 help='steps: only the configurations whose label has one of these words (a,b)')
  p.add_argument('--smoke', action='store_true')
  p.add_argument('--json', default=None, help='also write the results to this file')
  p.add_argument('--torch-autocast-worker', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.torch_autocast_worker:
    emit(torch_autocast_worker(args.model, args.batch, args.steps, args.budget))
    return
  if args.smoke:
    args.batch, args.repeat, args.steps, args.budget = 8, 1, 3, 2.0
  result = {'command': ' '.join(['python benchmarks/onednn_conv.py', *(argv or sys.argv[1:])]),
            'load_average_before': load_average()}
  parts = args.parts.split(',')
  if 'convs' in parts:
    result['convs'] = conv_table(args.batch, args.repeat, args.smoke)
  if 'steps' in parts:
    result['steps'] = step_table(args.model, args.batch, args.repeat, args.steps, args.budget,
                                 args.only)
  if 'kernels' in parts:
    result['kernels'] = kernels_used(args.model, args.batch)
  result['load_average_after'] = load_average()
  print(json.dumps(result, indent=1))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
