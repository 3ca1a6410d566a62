"""What the 8-device trajectory tests share (test_parallel, test_mixing, test_accumulate): a tiny
Conv-BN-pool-fc network, its random batches and initial variables, the loop that trains it with a
`parallel.DataParallel` strategy, and the child process the devices live in.

The simulated device count is fixed when JAX starts, so each test file runs itself as a script
(`run_child(__file__)`) whose `__main__` is `child_main(_child)`: it starts JAX with 8 CPU devices,
computes the trajectories and prints them as one JSON line. The child imports this module by name
as the parent does (running tests/test_x.py puts tests/ on sys.path, as pytest does).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Callable

import flax
import flax.linen as nn
import numpy as np

from cnnjax import layers

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 8
CLASSES = 5
IMAGE_SHAPE = (8, 8, 3)
NORMALIZE = {'mean': (127.5,) * 3, 'std': (64.0,) * 3}   # the StepRecipe fields for uint8 pixels


class TinyNet(nn.Module):
  """Conv -> BatchNorm -> ReLU -> pool -> fc: BatchNorm couples the examples of a batch (of each
  micro-batch when accumulating), so the devices must share its statistics to train alike."""
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.Conv2d(8, 3, padding=1, use_bias=False, name='conv1')(x)
    x = layers.BatchNorm(axis_name=self.bn_axis_name, name='bn1')(x, not train)
    return layers.Linear(CLASSES, name='fc')(layers.GlobalAvgPool()(nn.relu(x)))


def random_batches(steps: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """(steps, batch, 8, 8, 3) uint8 images and (steps, batch) labels, from a fixed seed."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (steps, batch, *IMAGE_SHAPE), dtype=np.uint8)
  return images, rng.integers(0, CLASSES, (steps, batch)).astype(np.int32)


def initial_variables() -> dict:
  """TinyNet's variables on the host: every run puts its own copy on its devices (the train
  steps donate the state)."""
  import jax
  from cnnjax import train
  return jax.device_get(train.init_variables(TinyNet(), IMAGE_SHAPE, jax.random.key(1)))


def train_tiny_net(mode: str, devices, variables: dict, optimizer, images: np.ndarray,
                   labels: np.ndarray, ema: bool = False, **recipe_fields):
  """Trains TinyNet from `variables` on the batches with `parallel.DataParallel.create(mode,
  devices)` (devices None: all); returns (strategy, recipe, state, per-step losses)."""
  import jax
  from cnnjax import parallel, train
  strategy = parallel.DataParallel.create(mode, devices)
  state = strategy.put_state(train.create_train_state(
      TinyNet(bn_axis_name=strategy.axis_name), variables, optimizer, jax.random.key(2), ema=ema))
  recipe = train.StepRecipe(**NORMALIZE, axis_name=strategy.axis_name, **recipe_fields)
  losses = []
  for step in range(len(images)):
    batch = strategy.put_batch({'image': images[step], 'label': labels[step]})
    state, metrics = strategy.train_step(state, batch, recipe)
    losses.append(float(metrics['loss']))
  return strategy, recipe, state, losses


def flat_variables(state, *collections: str) -> dict:
  """{'params/conv1/kernel': array, ...}: the state's collections flattened, on their devices."""
  return flax.traverse_util.flatten_dict({c: getattr(state, c) for c in collections}, sep='/')


def relative_error(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-30))


def child_main(child: Callable[[], dict]) -> None:
  """The child's `__main__`: JAX with DEVICES CPU devices, then `child()` printed as JSON."""
  import jax
  jax.config.update('jax_num_cpu_devices', DEVICES)
  print(json.dumps(child()))


def run_child(test_file: str) -> dict:
  """Runs `python test_file` in a fresh JAX (the CPU backend, this checkout's cnnjax, the
  suite's XLA flags and compilation cache) and returns the JSON its `child_main` printed."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, test_file], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
