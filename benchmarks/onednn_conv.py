"""oneDNN convolutions (cnnjax.kernels) against XLA's, and the train step they give against PyTorch.

    python benchmarks/onednn_conv.py            # all three parts below (~10 min on 2 busy cores)
    python benchmarks/onednn_conv.py --parts convs --repeat 5
    python benchmarks/onednn_conv.py --parts interleaved --steps 5
    python benchmarks/onednn_conv.py --smoke    # seconds: tiny shapes, one repeat

Parts (``--parts``, comma-separated):
* ``convs``: per convolution of small_resnet at batch 128 (NHWC, float32) and per pass (forward,
  backward-data, backward-weights): XLA (cnnjax's XLA:CPU flags), cnnjax's FFI handlers called
  directly (oneDNN's direct convolution, and Winograd F(4x4, 3x3) where it fits), and PyTorch's
  channels_last convolution (oneDNN too), each jitted / called alone, in one process; ``--repeat`` alternates them and keeps each one's best.
* ``steps``: small_resnet's train step (benchmarks/jax_worker.py, batch 128) with the kernels
  (``CNNJAX_ONEDNN=1``) and without (``CNNJAX_ONEDNN=0``), float32 and bfloat16, beside PyTorch
  eager and channels_last float32 (benchmarks/torch_worker.py) and channels_last + ``torch.autocast('cpu',
  torch.bfloat16)`` (here), each a fresh process, alternated ``--repeat`` times (medians).
* ``interleaved``: the float32 train steps of ``steps`` again (and cnnjax with oneDNN's direct
  convolutions only, ``use_winograd(False)``), but in this one process,
  alternated step by step (``--steps`` rounds): the fair comparison on a machine whose load
  changes between processes.
* ``kernels``: which oneDNN implementations ran in one bfloat16 and one float32 train step
  (``ONEDNN_VERBOSE=1``), and the instruction set oneDNN dispatches to.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
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
PASSES = ('forward', 'backward_data', 'backward_weights')


def _xla_passes(spec):
  import jax
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, spec.stride, spec.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return {'forward': jax.jit(lambda x, w, dy: conv(x, w)),
          'backward_data': jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
          'backward_weights': jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])}


def _onednn_passes(spec):
  """cnnjax's FFI handlers called directly, each jitted alone."""
  import jax
  from cnnjax.kernels import loader
  loader.library()
  call = lambda name, result, *args: jax.ffi.ffi_call(loader.TARGETS[name], result)(
      *args, **spec.attrs())
  shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  return {'forward': jax.jit(lambda x, w, dy: call('forward', shape(dy), x, w)),
          'backward_data': jax.jit(lambda x, w, dy: call('backward_data', shape(x), w, dy)),
          'backward_weights': jax.jit(lambda x, w, dy: call('backward_weights', shape(w), x, dy))}


def _torch_passes(spec, x, w, dy):
  """PyTorch's channels_last convolution (oneDNN inside) on the same values."""
  import numpy as np
  import torch
  import torch.nn.functional as F
  to = lambda a, perm: torch.from_numpy(np.array(a, np.float32)).permute(*perm)
  tx, tdy = to(x, (0, 3, 1, 2)), to(dy, (0, 3, 1, 2))             # NHWC memory: channels_last
  tw = to(w, (3, 2, 0, 1)).contiguous(memory_format=torch.channels_last)
  (pt, _), (pl, _) = spec.padding
  args = ([0], spec.stride, (pt, pl), spec.dilation, False, [0, 0], spec.groups)
  bwd = lambda mask: torch.ops.aten.convolution_backward(tdy, tx, tw, *args, mask)
  with torch.no_grad():
    return {'forward': lambda: F.conv2d(tx, tw, stride=spec.stride, padding=(pt, pl)),
            'backward_data': lambda: bwd([True, False, False]),
            'backward_weights': lambda: bwd([False, True, False])}


def _winograd_passes(spec, x, w, dy) -> dict:
  """The passes the library computes as Winograd for this convolution, as it reports after one
  call of each (the library alone decides where Winograd fits)."""
  import jax
  from cnnjax import kernels
  passes = {}
  for kind, f in _onednn_passes(spec).items():
    jax.block_until_ready(f(x, w, dy))
    if kernels.backend().get(f'last_{kind}', '').startswith('winograd'):
      passes[kind] = f
  return passes


def conv_table(batch: int, repeat: int, smoke: bool) -> list[dict]:
  """Per convolution and pass, float32, ms: XLA, cnnjax's oneDNN handlers and PyTorch
  channels_last, alternated in this process (load hits all alike), best of `repeat`."""
  import cnnjax
  cnnjax.configure_cpu()
  import jax
  import torch
  from cnnjax.kernels.conv import ConvSpec
  torch.set_num_threads(os.cpu_count())

  rows = []
  for name, hw, cin, cout, k, s, p in (CONVS[1:2] if smoke else CONVS):
    spec = ConvSpec((s, s), ((p, p), (p, p)), (1, 1), 1, winograd=False)
    oh = spec.output_hw((hw, hw), (k, k))[0]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, hw, hw, cin))
    w = jax.random.normal(keys[1], (k, k, cin, cout)) / (k * k * cin) ** 0.5
    dy = jax.random.normal(keys[2], (batch, oh, oh, cout))
    fns = {'xla': _xla_passes(spec), 'onednn': _onednn_passes(spec),
           'winograd': _winograd_passes(dataclasses.replace(spec, winograd=True), x, w, dy)}
    calls = {(b, kind): (lambda f=f: jax.block_until_ready(f(x, w, dy)))
             for b, passes in fns.items() for kind, f in passes.items()}
    calls.update({('torch', kind): f for kind, f in _torch_passes(spec, x, w, dy).items()})
    load = load_average()
    best = collections.defaultdict(lambda: float('inf'))
    for call in calls.values():
      call()                    # compile, create the primitives
    for _ in range(repeat):     # alternate: load hits all alike
      for key, call in calls.items():
        start = time.perf_counter()
        call()
        best[key] = min(best[key], time.perf_counter() - start)
    flops = 2 * batch * oh * oh * cout * cin * k * k
    for kind in PASSES:
      row = {'conv': name, 'pass': kind, 'load': load}
      for b in ('xla', 'onednn', 'winograd', 'torch'):
        if (b, kind) not in best:
          continue
        row[f'{b}_ms'] = round(1e3 * best[b, kind], 1)
        row[f'{b}_gflops'] = round(flops / best[b, kind] / 1e9, 1)
      rows.append(row)
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


def interleaved_steps(model: str, batch: int, steps: int,
                      precisions: tuple[str, ...] = ('float32',)) -> dict:
  """Train steps in this one process, alternated so load hits all alike, images/s of the median
  step. float32: cnnjax with oneDNN + Winograd convolutions (the default), with
  oneDNN's direct convolutions only and with XLA's, PyTorch eager and channels_last (also on one
  thread); bfloat16:
  cnnjax with ``model.dtype=bfloat16`` (as this CPU computes bfloat16 convolutions by default, and
  the other way where oneDNN has bfloat16 kernels: `cnnjax.kernels.conv.bfloat16_arithmetic`) and
  PyTorch channels_last + ``torch.autocast('cpu', torch.bfloat16)`` (torch_worker.py's model and
  loop)."""
  import cnnjax
  cnnjax.configure_cpu()
  import jax
  import torch
  import torch.nn.functional as F
  from cnnjax import kernels, train
  from cnnjax.kernels import loader
  from cnnjax.kernels.conv import bfloat16_arithmetic
  from jax_worker import host_batch, make_state
  from torch_worker import BUILDERS
  torch.set_num_threads(os.cpu_count())
  images = host_batch(model, batch, seed=1)
  on_device = jax.device_put(images)

  def jax_step(dtype, use=True, winograd=True, bf16_arithmetic=None):
    state, recipe = make_state(model, dtype)
    with (kernels.use_onednn(use), kernels.use_winograd(winograd),
          kernels.use_bfloat16_arithmetic(bf16_arithmetic)):
      compiled = train.jit_train_step.lower(state, on_device, recipe=recipe).compile()
    holder = [state]

    def step():
      holder[0], metrics = compiled(holder[0], on_device)   # the state is donated
      jax.block_until_ready(metrics)
    return step

  def torch_step(memory_format, autocast=False, threads=os.cpu_count()):
    torch.manual_seed(0)
    net = BUILDERS[model](in_channels=images['image'].shape[-1]).to(memory_format=memory_format)
    x = torch.from_numpy(images['image']).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    labels = torch.from_numpy(images['label']).long()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step():
      torch.set_num_threads(threads)
      opt.zero_grad(set_to_none=True)
      with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(net((x.float() - 127.5) / 64.0), labels)
      loss.backward()
      opt.step()
      loss.item()
    return step

  steps_of = {}
  if 'float32' in precisions:
    steps_of.update({
        'cnnjax float32, oneDNN + Winograd convolutions': jax_step('float32'),
        'cnnjax float32, oneDNN direct convolutions': jax_step('float32', winograd=False),
        'cnnjax float32, XLA convolutions': jax_step('float32', use=False),
        'PyTorch eager (NCHW) float32': torch_step(torch.contiguous_format),
        'PyTorch channels_last float32': torch_step(torch.channels_last),
        # one thread: on cores other processes also use, PyTorch's OpenMP team waits at every
        # op for a preempted thread, and small nets then run fastest on one
        'PyTorch channels_last float32, 1 thread': torch_step(torch.channels_last, threads=1)})
  if 'bfloat16' in precisions:
    steps_of['cnnjax bfloat16, oneDNN + Winograd convolutions'] = jax_step('bfloat16')
    lib = loader.library(warn=False)
    if lib is not None and lib.bf16_native:   # the other way oneDNN can compute them here
      other = 'float32' if bfloat16_arithmetic(lib)[0] == 'native' else 'native'
      steps_of[f'cnnjax bfloat16, use_bfloat16_arithmetic({other!r})'] = jax_step(
          'bfloat16', bf16_arithmetic=other)
    steps_of['PyTorch channels_last + autocast bfloat16'] = torch_step(torch.channels_last, True)
  # Each round times every configuration for about half a second: one step of a ResNet, a block
  # of steps (at most 50) of a small net, after one untimed step that lets the previous configuration's
  # threads (XLA's, oneDNN's and PyTorch's OpenMP pools) go quiet; alternated step by step, a
  # small net's steps ran 2-20x slower than alone.
  block = {}
  for label, step in steps_of.items():
    step()                       # warm-up: compile, create the primitives
    start = time.perf_counter()
    step()
    block[label] = max(1, min(50, round(0.5 / (time.perf_counter() - start))))
  times = collections.defaultdict(list)
  load = load_average()
  for _ in range(steps):
    for label, step in steps_of.items():
      if block[label] > 1:
        step()
      for _ in range(block[label]):
        start = time.perf_counter()
        step()
        times[label].append(time.perf_counter() - start)
  result = {label: round(batch / statistics.median(t), 1) for label, t in times.items()}
  result['load_average'] = [load, load_average()]
  result['backend'] = kernels.backend()
  return result


def train_gflop_per_image(model: str) -> float:
  """A train step's arithmetic per image as the field counts it: 6 x the forward MACs (forward,
  input gradient, weight gradient; 2 FLOPs per MAC), from cnnjax.summary."""
  import cnnjax
  from common import MODELS, NUM_CLASSES
  h, w, c = MODELS[model]
  net = cnnjax.get_model(model, num_classes=NUM_CLASSES, in_channels=c)
  return 6 * cnnjax.summary(net, (h, w, c), print_fn=None).total_macs / 1e9


def isa_peak_gflops(isa: str) -> float | None:
  """The float32 peak the instruction set allows on these cores, nominally: two FMA pipes of
  8 (AVX2) or 16 (AVX-512) lanes, 2 FLOPs each, per core per cycle at /proc/cpuinfo's clock
  (a VM's nominal clock: boost clocks can be higher). AMD's Zen 4 (family 25) executes AVX-512
  on its two 256-bit pipes, so 8 lanes there (its float32 matmul: 178 GFLOP/s of a nominal 166 at
  2.6 GHz, benchmarks/README.md). None when the clock is not known."""
  try:
    with open('/proc/cpuinfo') as f:
      info = dict(line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines()
                  if ':' in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    mhz = float(info['cpu MHz'])
  except (OSError, KeyError, ValueError):
    return None
  lanes = 16 if isa.startswith('avx512') else 8 if isa.startswith('avx2') else 4
  if lanes == 16 and info.get('vendor_id') == 'AuthenticAMD' and info.get('cpu family') == '25':
    lanes = 8
  return round(len(os.sched_getaffinity(0)) * 2 * lanes * 2 * mhz / 1e3, 1)


def matmul_peak_gflops(n: int = 2048, repeat: int = 5) -> float:
  """What these cores reach on float32 arithmetic: PyTorch's best square matmul (its BLAS), in
  GFLOP/s, best of `repeat`."""
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  best = float('inf')
  for _ in range(repeat + 1):
    start = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - start)
  return round(2 * n ** 3 / best / 1e9, 1)


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
  p.add_argument('--precisions', default='float32',
                 help='interleaved: float32 and/or bfloat16 (comma-separated)')
  p.add_argument('--torch-autocast-worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--interleaved-worker', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.torch_autocast_worker:
    emit(torch_autocast_worker(args.model, args.batch, args.steps, args.budget))
    return
  if args.interleaved_worker:   # for bench.py: one model's interleaved steps and its FLOPs
    result = interleaved_steps(args.model, args.batch, args.steps,
                               tuple(args.precisions.split(',')))
    result['train_gflop_per_image'] = train_gflop_per_image(args.model)
    result['matmul_peak_gflops'] = matmul_peak_gflops()
    result['isa_peak_gflops'] = isa_peak_gflops(result['backend'].get('isa', ''))
    emit(result)
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
  if 'interleaved' in parts:
    result['interleaved'] = interleaved_steps(args.model, args.batch, args.steps,
                                              tuple(args.precisions.split(',')))
  if 'kernels' in parts:
    result['kernels'] = kernels_used(args.model, args.batch)
  result['load_average_after'] = load_average()
  print(json.dumps(result, indent=1))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
