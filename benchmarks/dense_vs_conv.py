"""The classic "fully connected vs convolution" profile, in JAX (cnnjax layers) or PyTorch.

A fully connected neuron sees the whole image: on 32x32x3 it has 3,072 weights, on 200x200x3
120,000. A convolutional neuron sees a 5x5x3 patch (75 weights) and shares them across every
position, so its parameter count does not grow with the image, while its compute does. For each
input size this measures a fully connected layer of ``--units`` neurons and a 5x5 convolution of
as many filters ('same' padding): parameters, multiply-accumulates per image, and the time of a
forward and of a forward+backward pass over a batch.

Run by bench.py; by hand: ``python benchmarks/dense_vs_conv.py --framework jax``.
"""
from __future__ import annotations

import argparse

from common import emit, summarize, time_steps

SIZES = ((32, 32, 3), (200, 200, 3))
KERNEL = 5


def layer_specs(hwc, units: int) -> dict:
  h, w, c = hwc
  return {
      'dense': {'params': h * w * c * units + units, 'weights_per_neuron': h * w * c,
                'macs_per_image': h * w * c * units, 'output_shape': [units]},
      'conv': {'params': KERNEL * KERNEL * c * units + units, 'weights_per_neuron': KERNEL * KERNEL * c,
               'macs_per_image': h * w * KERNEL * KERNEL * c * units, 'output_shape': [h, w, units]},
  }


def run_jax(batch: int, units: int, steps: int, warmup: int) -> dict:
  import cnnjax
  cnnjax.configure_cpu()  # XLA flags and cache before JAX starts a backend
  import jax
  import jax.numpy as jnp
  from cnnjax.layers import Conv2d, Linear

  out = {}
  for hwc in SIZES:
    x = jax.random.normal(jax.random.key(0), (batch, *hwc))
    layers = {'dense': (Linear(units), lambda x: x.reshape(x.shape[0], -1)),
              'conv': (Conv2d(units, KERNEL, padding='same'), lambda x: x)}
    row = layer_specs(hwc, units)
    for kind, (layer, prep) in layers.items():
      params = layer.init(jax.random.key(1), prep(x[:1]))
      fwd = jax.jit(lambda p, x, layer=layer, prep=prep: layer.apply(p, prep(x)))
      grad = jax.jit(jax.grad(lambda p, x, layer=layer, prep=prep: jnp.sum(layer.apply(p, prep(x)) ** 2)))
      assert sum(a.size for a in jax.tree.leaves(params)) == row[kind]['params']
      row[kind]['forward'] = summarize(
          time_steps(lambda: fwd(params, x).block_until_ready(), steps, warmup), batch)
      row[kind]['forward_backward'] = summarize(
          time_steps(lambda: jax.block_until_ready(grad(params, x)), steps, warmup), batch)
    out['x'.join(map(str, hwc))] = row
  return out


def run_torch(batch: int, units: int, steps: int, warmup: int, threads: int) -> dict:
  import torch
  torch.set_num_threads(threads)
  out = {}
  for h, w, c in SIZES:
    x = torch.randn(batch, c, h, w)
    layers = {'dense': (torch.nn.Linear(h * w * c, units), lambda x: x.flatten(1)),
              'conv': (torch.nn.Conv2d(c, units, KERNEL, padding='same'), lambda x: x)}
    row = layer_specs((h, w, c), units)
    for kind, (layer, prep) in layers.items():
      assert sum(p.numel() for p in layer.parameters()) == row[kind]['params']

      def forward():
        with torch.inference_mode():
          layer(prep(x))

      def forward_backward():
        layer.zero_grad(set_to_none=True)
        (layer(prep(x)) ** 2).sum().backward()

      row[kind]['forward'] = summarize(time_steps(forward, steps, warmup), batch)
      row[kind]['forward_backward'] = summarize(time_steps(forward_backward, steps, warmup), batch)
    out[f'{h}x{w}x{c}'] = row
  return out


def main(argv=None) -> None:
  import os
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--framework', required=True, choices=['jax', 'torch'])
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--units', type=int, default=64)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--threads', type=int, default=os.cpu_count())
  a = p.parse_args(argv)
  if a.framework == 'jax':
    result = run_jax(a.batch, a.units, a.steps, a.warmup)
  else:
    result = run_torch(a.batch, a.units, a.steps, a.warmup, a.threads)
  emit({'framework': a.framework, 'batch': a.batch, 'units': a.units, 'kernel': KERNEL,
        'sizes': result})


if __name__ == '__main__':
  main()
