"""Where arrays live and how the compiled steps run on many devices and hosts.

Two strategies with one interface (`DataParallel`), chosen by `config.parallel.mode`:

* 'jit' (default): `jax.jit` over a 1-D mesh of all devices. The batch is sharded along the
  mesh axis (`NamedSharding`), the train state is replicated; XLA inserts the gradient
  all-reduce, and BatchNorm statistics are global because the model sees one logical batch.
* 'pmap': `jax.pmap` with the axis name `AXIS`. Each device runs `train.train_step` on its
  slice; the step `pmean`s gradients and metrics over `AXIS` (`StepRecipe.axis_name`) and the
  model's BatchNorm layers average their statistics over it (build the model with
  `bn_axis_name=AXIS`). The state goes in and comes out unmapped (`in_axes=None`,
  `out_axes=None`, which pmap accepts since it became jit over shard_map; JAX 0.10 and newer
  are supported), so in both modes the state between steps is the same replicated global array
  and checkpoints do not depend on the mode.

Multi-host: `initialize_distributed` starts JAX's distributed runtime; every process then feeds
only its own rows of each global batch (`process_rows`) and `put_batch` assembles the global
array.

A train batch must divide over the devices (`check_batch_size` says what to set); an eval batch
need not: `DataParallel.eval_batch_size` rounds it up to a multiple of the devices and processes
and `data.eval_batches` masks the padded rows. The loop:

  strategy = parallel.DataParallel.create(config.parallel.mode)
  state = strategy.put_state(state)
  state, metrics = strategy.train_step(state, strategy.put_batch(local_batch), recipe)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnnjax import runtime, train
from cnnjax.data.batching import process_share
from cnnjax.errors import BatchSplitError  # noqa: F401  (re-exported: raised here)
from cnnjax.errors import ConfigError

AXIS = 'data'       # the mesh axis under 'jit' and the pmap axis name under 'pmap'
MODES = ('jit', 'pmap')



def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh; devices ordered by process so each host's rows of a batch are contiguous."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (AXIS,))


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'train.batch_size') -> int:
  """Returns the per-device batch; raises when `batch_size` does not divide over the devices."""
  n = mesh.devices.size
  if batch_size % n:
    raise BatchSplitError(f'{name}={batch_size} does not divide over {n} devices; set {name} '
                          f'to a multiple of {n}, e.g. {name}={round_up(batch_size, n)}.')
  return batch_size // n


def replicate(tree, mesh: Mesh):
  """Puts a pytree on every device of the mesh (the train state).

  Under multi-host each process passes its own copy (the same values: same seed, same
  checkpoint) and gets global arrays; no cross-host transfer happens.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, NamedSharding(mesh, P()))
  from jax.experimental import multihost_utils
  return multihost_utils.host_local_array_to_global_array(tree, mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's rows of the global batch into globally sharded arrays."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def process_rows(global_batch: int) -> slice:
  """This process's rows of every global batch (all rows on a single host)."""
  return process_share(global_batch, jax.process_index(), jax.process_count())


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1) -> bool:
  """Starts JAX's multi-host runtime when this is one process of several; True if it did.

  Sources, first match wins: the arguments (`config.parallel`), the environment
  (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), then a cluster JAX
  detects itself (SLURM with several tasks, a multi-host Cloud TPU slice). With none of them it
  does nothing (one process). Must run before JAX touches a device.
  """
  if jax.distributed.is_initialized():
    return False
  env = os.environ
  address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS', '')
  if not num_processes and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id < 0 and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])
  if address:
    jax.distributed.initialize(address, num_processes=num_processes or None,
                               process_id=process_id if process_id >= 0 else None)
    return True
  if _in_multi_process_cluster(env):
    jax.distributed.initialize()  # JAX reads the cluster's own description
    return True
  return False


def _in_multi_process_cluster(env) -> bool:
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_JOB_ID' in env:
    return True
  hosts = env.get('TPU_WORKER_HOSTNAMES') or env.get('TPU_PROCESS_ADDRESSES') or ''
  return len([h for h in hosts.split(',') if h.strip()]) > 1


@dataclasses.dataclass(frozen=True, eq=False)
class DataParallel:
  """Places state and batches and runs the compiled train/eval steps for one mode."""
  mode: str
  mesh: Mesh

  @classmethod
  def create(cls, mode: str = 'jit', devices=None) -> 'DataParallel':
    if mode not in MODES:
      raise ConfigError(f"parallel.mode must be one of {', '.join(MODES)}, got '{mode}'.")
    mesh = data_mesh(devices)
    if mode == 'pmap' and list(mesh.devices.flat) != jax.devices()[:mesh.devices.size]:
      raise ConfigError("parallel.mode='pmap' maps over the first devices of jax.devices(); "
                       "pass such a prefix (or no devices).")
    return cls(mode, mesh)

  @property
  def axis_name(self) -> str | None:
    """What the step and BatchNorm average over: AXIS under pmap, None under jit."""
    return AXIS if self.mode == 'pmap' else None

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def local_devices(self) -> list:
    return [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]

  def eval_batch_size(self, requested: int, num_examples: int) -> int:
    """The eval batch to use when `requested` rows per batch are asked for over `num_examples`
    examples: rounded up to a multiple of the devices (and of the processes), and no larger than
    all the examples rounded up the same way. `data.eval_batches` pads the last batch and masks
    the padded rows, so every example still counts exactly once."""
    multiple = math.lcm(self.num_devices, jax.process_count())
    return min(round_up(requested, multiple), round_up(num_examples, multiple))

  def describe(self, global_batch: int) -> str:
    """One start-up line: devices, hosts, global and per-device batch."""
    per_device = check_batch_size(global_batch, self.mesh)
    kind = self.mesh.devices.flat[0].device_kind
    return (f'devices: {self.num_devices} x {kind} ({self.mode}) on {jax.process_count()} '
            f'host(s); global batch {global_batch}, {per_device} per device')

  def put_state(self, state):
    """The state replicated on every device (the form both steps take and return)."""
    return replicate(state, self.mesh)

  def put_batch(self, local_batch: dict) -> dict:
    """This process's rows of a global batch, laid out for the step."""
    if self.mode == 'jit':
      return shard_batch(local_batch, self.mesh)
    n = len(self.local_devices)
    out = {}
    for key, value in local_batch.items():
      value = np.asarray(value)
      if len(value) % n:
        raise BatchSplitError(f'a batch of {len(value)} rows does not divide over {n} local '
                              f'devices.')
      out[key] = value.reshape(n, len(value) // n, *value.shape[1:])
    return out

  def train_step(self, state, batch: dict, recipe: train.StepRecipe):
    """(state, metrics): one optimizer step on the global batch; metrics are global means."""
    self._check_recipe(recipe)
    if self.mode == 'jit':
      return _jit_steps(self.mesh)[0](state, batch, recipe)
    return self._global(_pmap_train_step(state, batch, recipe))

  def eval_step(self, state, batch: dict, recipe: train.StepRecipe) -> dict:
    """Sums of loss/correct/correct5/count over the global batch's real rows."""
    self._check_recipe(recipe)
    if self.mode == 'jit':
      return _jit_steps(self.mesh)[1](state, batch, recipe)
    return self._global(_pmap_eval_step(state, batch, recipe))

  def _check_recipe(self, recipe: train.StepRecipe) -> None:
    if recipe.axis_name != self.axis_name:
      raise ValueError(f"the step recipe's axis_name is {recipe.axis_name!r} but parallel "
                       f"mode '{self.mode}' needs {self.axis_name!r}.")

  def _global(self, tree):
    """pmap returns unmapped outputs per host under multi-host: make them global again."""
    return tree if jax.process_count() == 1 else replicate(tree, self.mesh)


@functools.lru_cache(maxsize=None)
def _jit_steps(mesh: Mesh):
  """train_step and eval_step compiled for `mesh`, their outputs pinned replicated."""
  replicated = NamedSharding(mesh, P())
  train_fn = jax.jit(train.train_step, static_argnames='recipe', donate_argnames='state',
                     out_shardings=replicated)
  eval_fn = jax.jit(train.eval_step, static_argnames='recipe', out_shardings=replicated,
                    compiler_options=runtime.eval_compiler_options(mesh.devices.flat[0].platform))
  return train_fn, eval_fn


# The state is broadcast in and comes back unmapped (identical on every device: gradients and
# BatchNorm statistics are averaged over AXIS inside the step); the batch is mapped on axis 0.
_pmap_train_step = jax.pmap(train.train_step, AXIS, in_axes=(None, 0, None), out_axes=None,
                            static_broadcasted_argnums=2, donate_argnums=0)
_pmap_eval_step = jax.pmap(train.eval_step, AXIS, in_axes=(None, 0, None), out_axes=None,
                           static_broadcasted_argnums=2)
