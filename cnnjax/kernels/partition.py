"""Batch partitioning of the convolution passes, for ``jax.jit`` over sharded batches.

An FFI call is opaque to XLA's SPMD partitioner: without help it would gather the whole batch on
every device and run the convolution there. `batch_partitioned` wraps a pass in
`jax.experimental.custom_partitioning` so that each device runs it on its own rows: activations
and activation gradients keep the sharding of their batch axis (everything else replicated), and
the kernel gradient, a sum over the batch, is reduced with `psum` over the batch's mesh axes.
On one device, under ``pmap`` and inside ``shard_map`` JAX inlines the pass unchanged.
"""
from __future__ import annotations

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

# Shardy's view of each pass (x: n h w c, kernel: k l i o, y: n p q o), so it propagates the
# batch sharding through and never asks for the spatial or channel axes to be split.
_RULES = {
    'forward': 'n h w c, k l i o -> n p q o',
    'backward_data': 'n h w c, k l i o, n p q o -> n h w c',
    'backward_weights': 'n h w c, k l i o, n p q o -> k l i o',
}
# Per pass: which operands are batched (the rest replicated); whether the result is batched
# (True) or a sum over the batch (False: psum over the batch's mesh axes).
_OPERANDS = {'forward': (True, False), 'backward_data': (True, False, True),
             'backward_weights': (True, False, True)}
_RESULT_BATCHED = {'forward': True, 'backward_data': True, 'backward_weights': False}


def _batch_axes(sharding):
  """The mesh axes of a NamedSharding's first (batch) dimension, or None."""
  spec = getattr(sharding, 'spec', None)
  if not spec:
    return None
  return spec[0]


def _axis_names(batch) -> tuple:
  if batch is None:
    return ()
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def batch_partitioned(kind: str, fn):
  """`fn` (a pass of `_RULES`) partitioned over the batch axis under ``jax.jit``."""
  batched = _RESULT_BATCHED[kind]

  def shardings(mesh, arg_shapes):
    batch = _batch_axes(arg_shapes[0].sharding)
    spec = lambda batched: NamedSharding(mesh, P(batch) if batched else P())
    return batch, tuple(spec(b) for b in _OPERANDS[kind]), spec(batched)

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes)[2]

  def partition(mesh, arg_shapes, result_shape):
    batch, args, out = shardings(mesh, arg_shapes)
    names = _axis_names(batch)

    def lower(*operands):
      y = fn(*operands)
      return y if batched or not names else jax.lax.psum(y, names)
    return mesh, lower, out, args

  wrapped = custom_partitioning(fn)
  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=_RULES[kind])
  return wrapped
