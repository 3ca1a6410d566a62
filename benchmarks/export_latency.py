"""Inference latency of one model in four runtimes, side by side in one run: JAX (jit), the
exported ONNX model in onnxruntime (float32 and int8), and PyTorch eager with the same weights.

    python benchmarks/export_latency.py                  # mnist_cnn and resnet18, batches 1 and 64
    python benchmarks/export_latency.py --workdir runs/quickstart  # quickstart's trained weights
    python benchmarks/export_latency.py --smoke          # seconds: mnist_cnn, batches 1 and 4

Models: quickstart's ``mnist_cnn`` (28x28x1, 10 classes; the best checkpoint of ``--workdir`` when
given, else initialized with seed 0) and ``resnet18`` (224x224x3, 1000 classes, torchvision's
architecture with torch's seed-0 initialization, imported into cnnjax through its torchvision
weight map). A preparing process exports each to ONNX (cnnjax.export, checked against JAX) and
quantizes it to int8 (calibrated on 256 training digits for mnist_cnn, on 64 random images for
resnet18: latency does not depend on the calibration). Then each runtime runs in its own process
(no shared thread pools or caches), one after another, on the same random batch: the median wall
time per call after warm-up, every runtime with its default threads on all cores (``--threads N``
sets them all: on a busy machine PyTorch's OpenMP threads spin against other processes, and one
thread each compares the kernels). PyTorch takes NCHW input, the others NHWC. Prints a Markdown
table and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from common import emit, load_average, parse, summarize, time_steps  # noqa: E402

MODELS = {'mnist_cnn': ((28, 28, 1), 10), 'resnet18': ((224, 224, 3), 1000)}
RUNTIMES = ('jax', 'onnxruntime', 'onnxruntime-int8', 'torch')


def _flat(variables) -> dict:
  import flax
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(variables).items()}


def _unflat(arrays) -> dict:
  import flax
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): arrays[k] for k in arrays.files})


def _torch_mnist_cnn(variables):
  """mnist_cnn as a torch module (NCHW) holding the cnnjax variables."""
  import numpy as np
  import torch
  from torch import nn
  p, s = variables['params'], variables['batch_stats']
  net = nn.Sequential(
      nn.Conv2d(1, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(16, 32, 5, padding=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
  with torch.no_grad():
    for conv, bn, i in ((net[0], net[1], 1), (net[4], net[5], 2)):
      conv.weight.copy_(t(np.transpose(p[f'conv{i}']['kernel'], (3, 2, 0, 1))))
      bn.weight.copy_(t(p[f'bn{i}']['scale']))
      bn.bias.copy_(t(p[f'bn{i}']['bias']))
      bn.running_mean.copy_(t(s[f'bn{i}']['mean']))
      bn.running_var.copy_(t(s[f'bn{i}']['var']))
    # cnnjax flattens H,W,C; torch C,H,W: reorder fc1's input rows.
    fc1 = p['fc1']['kernel'].reshape(7, 7, 32, 128).transpose(2, 0, 1, 3).reshape(-1, 128)
    net[9].weight.copy_(t(fc1.T))
    net[9].bias.copy_(t(p['fc1']['bias']))
    net[11].weight.copy_(t(p['fc2']['kernel'].T))
    net[11].bias.copy_(t(p['fc2']['bias']))
  return net


def prepare(model_name: str, out: pathlib.Path, workdir: str | None) -> dict:
  """Writes <out>/<model>.npz (cnnjax variables), .pth (resnet18), .onnx and .int8.onnx."""
  import numpy as np
  if model_name == 'resnet18':
    import torch
    import torchvision
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), out / 'resnet18.pth')
  import jax
  import jax.numpy as jnp
  import cnnjax
  from cnnjax import data, export, models
  cnnjax.configure_cpu()
  shape, classes = MODELS[model_name]
  rng = np.random.default_rng(0)
  if model_name == 'resnet18':
    model, variables = cnnjax.pretrained('resnet18', weights=str(out / 'resnet18.pth'))
    calibration = rng.normal(size=(64, *shape)).astype(np.float32)
  else:
    model = models.get_model(model_name, num_classes=classes, in_channels=shape[-1])
    if workdir:
      from cnnjax import checkpoint
      from cnnjax.export import run_export
      variables, _ = checkpoint.load_variables(
          run_export.best_step_dir(pathlib.Path(workdir), 'test_accuracy'))
    else:
      variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
    ds = data.load_dataset('mnist5k')
    calibration = ((ds.x_train[:256].astype(np.float32) - ds.mean[0]) / ds.std[0])
  variables = jax.device_get(variables)
  np.savez(out / f'{model_name}.npz', **_flat(variables))
  images = rng.normal(size=(4, *shape)).astype(np.float32)
  check = export.to_onnx(model, variables, out / f'{model_name}.onnx', images)
  float_blob = (out / f'{model_name}.onnx').read_bytes()
  int8 = export.quantize.quantize_int8(float_blob, calibration.astype(np.float32))
  (out / f'{model_name}.int8.onnx').write_bytes(int8)
  return {'onnx_bytes': len(float_blob), 'int8_bytes': len(int8),
          'max_relative_error': check.max_relative_error}


def measure(runtime: str, model_name: str, out: pathlib.Path, batches, calls: int,
            threads: int) -> dict:
  import numpy as np
  shape, classes = MODELS[model_name]
  results = {}
  if runtime == 'torch':
    import torch
    import torchvision
    if threads:
      torch.set_num_threads(threads)
    if model_name == 'resnet18':
      net = torchvision.models.resnet18()
      net.load_state_dict(torch.load(out / 'resnet18.pth', weights_only=True))
      net.eval()
    else:
      net = _torch_mnist_cnn(_unflat(np.load(out / f'{model_name}.npz')))
    run = lambda x: net(x)  # noqa: E731
    make = lambda b: torch.from_numpy(  # noqa: E731
        np.random.default_rng(1).normal(size=(b, *shape)).astype(np.float32).transpose(0, 3, 1, 2)
        .copy())
    context = torch.no_grad
  elif runtime == 'jax':
    if threads == 1:
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 ' --xla_cpu_multi_thread_eigen=false').strip()
    import jax
    import cnnjax
    cnnjax.configure_cpu()
    from cnnjax import models
    model = models.get_model(model_name, num_classes=classes, in_channels=shape[-1])
    variables = jax.device_put(_unflat(np.load(out / f'{model_name}.npz')))
    apply = jax.jit(lambda x: model.apply(variables, x))
    run = lambda x: apply(x).block_until_ready()  # noqa: E731
    make = lambda b: jax.device_put(  # noqa: E731
        np.random.default_rng(1).normal(size=(b, *shape)).astype(np.float32))
    import contextlib
    context = contextlib.nullcontext
  else:
    import contextlib
    import onnxruntime as ort
    suffix = '.int8.onnx' if runtime.endswith('int8') else '.onnx'
    options = ort.SessionOptions()
    if threads:
      options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(out / f'{model_name}{suffix}'), options,
                                   providers=['CPUExecutionProvider'])
    run = lambda x: session.run(None, {'image': x})[0]  # noqa: E731
    make = lambda b: (  # noqa: E731
        np.random.default_rng(1).normal(size=(b, *shape)).astype(np.float32))
    context = contextlib.nullcontext
  with context():
    for b in batches:
      x = make(b)
      times = time_steps(lambda: run(x), n=calls, warmup=3, budget_s=20.0, min_steps=5)
      results[str(b)] = summarize(times, b)
  return results


def worker(args) -> int:
  out = pathlib.Path(args.dir)
  if args.worker == 'prepare':
    emit(prepare(args.model, out, args.workdir))
  else:
    emit(measure(args.worker, args.model, out, [int(b) for b in args.batches.split(',')],
                 args.calls, args.threads))
  return 0


def run_worker(*argv) -> dict:
  proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                        cwd=ROOT, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  if proc.returncode != 0:
    raise SystemExit(f'worker {argv} failed:\n{proc.stderr[-3000:]}')
  return parse(proc.stdout)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default=None, help="a quickstart run: its best checkpoint")
  parser.add_argument('--smoke', action='store_true', help='mnist_cnn, batches 1 and 4, 10 calls')
  parser.add_argument('--json', default=None, help='also write the results here')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--model', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--dir', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--batches', default='1,64', help='batch sizes (default 1,64)')
  parser.add_argument('--calls', type=int, default=50, help='timed calls per batch (default 50)')
  parser.add_argument('--threads', type=int, default=0,
                      help='threads per runtime (torch.set_num_threads, onnxruntime intra-op; 1 '
                           'also turns off XLA:CPU multi-threading); default 0: their own')
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  names = ['mnist_cnn'] if args.smoke else list(MODELS)
  batches = '1,4' if args.smoke else args.batches
  calls = 10 if args.smoke else args.calls
  try:
    import torch  # noqa: F401
    runtimes = RUNTIMES
  except ImportError:
    runtimes = RUNTIMES[:3]
    print('PyTorch is not installed: its column is left out.')
  results = {'load_average_before': load_average(), 'threads': args.threads, 'models': {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      extra = ['--workdir', args.workdir] if args.workdir and name == 'mnist_cnn' else []
      entry = {'prepare': run_worker('--worker', 'prepare', '--model', name, '--dir', tmp,
                                     *extra)}
      for runtime in runtimes:
        entry[runtime] = run_worker('--worker', runtime, '--model', name, '--dir', tmp,
                                    '--batches', batches, '--calls', str(calls),
                                    '--threads', str(args.threads))
      results['models'][name] = entry
  results['load_average_after'] = load_average()
  print(table(results, runtimes))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + '\n')
  return 0


def table(results: dict, runtimes) -> str:
  lines = ['| model | batch | ' + ' | '.join(f'{r} ms (img/s)' for r in runtimes) + ' |',
           '|---|---|' + '---|' * len(runtimes)]
  for name, entry in results['models'].items():
    for batch in entry[runtimes[0]]:
      cells = [f"{entry[r][batch]['step_ms']:.2f} ({entry[r][batch]['images_per_s']:.0f})"
               for r in runtimes]
      lines.append(f'| {name} | {batch} | ' + ' | '.join(cells) + ' |')
    p = entry['prepare']
    lines.append(f"| {name} files | | ONNX {p['onnx_bytes'] / 2**20:.2f} MiB, int8 "
                 f"{p['int8_bytes'] / 2**20:.2f} MiB ({p['onnx_bytes'] / p['int8_bytes']:.2f}x) |"
                 + ' |' * (len(runtimes) - 1))
  threads = results['threads'] or "each runtime's default"
  lines.append(f"\nthreads per runtime: {threads}; load average before "
               f"{results['load_average_before']}, after {results['load_average_after']}")
  return '\n'.join(lines)


if __name__ == '__main__':
  sys.exit(main())
