"""Where arrays live: a 1-D data mesh over all devices, the batch sharded, the state replicated.

`jax.jit` over this mesh is the default parallelism: every device computes on its slice of the
global batch, XLA inserts the gradient all-reduce, and BatchNorm statistics are global because
the model sees one logical (sharded) batch.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


class BatchSplitError(ValueError):
  """The global batch does not divide over the devices."""


def data_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'train.batch_size') -> int:
  """Returns the per-device batch; raises when `batch_size` does not divide over the devices."""
  n = mesh.devices.size
  if batch_size % n:
    raise BatchSplitError(f'{name}={batch_size} does not divide over {n} devices; '
                          f'use a multiple of {n}.')
  return batch_size // n


def replicate(tree, mesh: Mesh):
  """Puts a pytree on every device of the mesh (the train state)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's part of the global batch into globally sharded arrays."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
