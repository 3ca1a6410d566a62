"""The three passes of one 3x3 convolution (forward, input gradient, weight gradient), XLA vs PyTorch.

    python benchmarks/conv_passes.py            # ResNet's 3x3 stride-1 convs at batch 128

Nearly all of a ResNet train step is these passes, so this is where cnnjax's ResNet ratios come
from. Each framework runs in its own process: JAX with cnnjax's CPU configuration
(``cnnjax.configure_cpu()``), NHWC; PyTorch eager (oneDNN) in NCHW and channels_last, 2 threads, through
``torch.ops.aten.convolution_backward`` so each gradient is timed alone. Prints the best of
``--repeat`` calls in ms and GFLOP/s (2 * N*H*W * 9*C*O per pass).
"""
from __future__ import annotations

import argparse

from bench import run_worker, worker_env
from common import emit, time_steps

# (H = W, C in = C out): the 3x3 convs of ResNet-18's four stages on 32x32 inputs.
SHAPES = [(32, 64), (16, 128), (8, 256), (4, 512)]
PASSES = ('fwd', 'grad_input', 'grad_weight')


def _best_ms(fn, repeat: int) -> float:
  return 1e3 * min(time_steps(fn, repeat, warmup=1))  # the warm-up call compiles


def run_jax(batch: int, repeat: int) -> dict:
  import cnnjax
  cnnjax.configure_cpu()  # cnnjax's XLA:CPU flags, before JAX starts a backend
  import jax
  from jax import lax

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  fwd = jax.jit(conv)
  grad_input = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  grad_weight = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  out = {}
  for h, c in SHAPES:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, h, h, c))
    w = 0.05 * jax.random.normal(keys[1], (3, 3, c, c))
    g = jax.random.normal(keys[2], (batch, h, h, c))
    out[f'{h}x{h}x{c}'] = {
        'fwd': _best_ms(lambda: fwd(x, w).block_until_ready(), repeat),
        'grad_input': _best_ms(lambda: grad_input(x, w, g).block_until_ready(), repeat),
        'grad_weight': _best_ms(lambda: grad_weight(x, w, g).block_until_ready(), repeat)}
  return out


def run_torch(batch: int, repeat: int, channels_last: bool) -> dict:
  import torch
  torch.set_num_threads(2)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  out = {}
  for h, c in SHAPES:
    x = torch.randn(batch, c, h, h).contiguous(memory_format=fmt)
    w = (0.05 * torch.randn(c, c, 3, 3)).contiguous(memory_format=fmt)
    g = torch.randn(batch, c, h, h).contiguous(memory_format=fmt)
    backward = lambda mask: torch.ops.aten.convolution_backward(
        g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
    with torch.no_grad():
      out[f'{h}x{h}x{c}'] = {
          'fwd': _best_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeat),
          'grad_input': _best_ms(lambda: backward([True, False, False]), repeat),
          'grad_weight': _best_ms(lambda: backward([False, True, False]), repeat)}
  return out


def _worker(which: str, a) -> dict | None:
  result = run_worker('conv_passes.py', ['--worker', which, '--batch', str(a.batch), '--repeat',
                                         str(a.repeat)], worker_env(), timeout=600)
  if 'error' in result:
    print(f'[{which}] {result["error"]}')
    return None
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--repeat', type=int, default=5)
  p.add_argument('--worker', choices=['jax', 'torch_nchw', 'torch_channels_last'],
                 help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker:
    result = (run_jax(a.batch, a.repeat) if a.worker == 'jax'
              else run_torch(a.batch, a.repeat, a.worker == 'torch_channels_last'))
    emit(result)
    return
  runs = {name: _worker(name, a) for name in ('jax', 'torch_nchw', 'torch_channels_last')}
  print(f'| 3x3 conv, batch {a.batch} | pass | cnnjax (XLA:CPU) ms | PyTorch NCHW ms | '
        'PyTorch channels_last ms | GFLOP/s (cnnjax / NCHW / channels_last) |')
  print('|---|---|---|---|---|---|')
  for h, c in SHAPES:
    key = f'{h}x{h}x{c}'
    gflop = 2 * a.batch * h * h * 9 * c * c / 1e9
    for name in PASSES:
      ms = [runs[r][key][name] if runs[r] else None for r in runs]
      cells = ['-' if m is None else f'{m:.1f}' for m in ms]
      rates = ' / '.join('-' if m is None else f'{gflop / m * 1e3:.0f}' for m in ms)
      print(f'| {key} | {name} | {" | ".join(cells)} | {rates} |')


if __name__ == '__main__':
  main()
