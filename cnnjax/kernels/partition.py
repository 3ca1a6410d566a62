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
    'backward': 'n h w c, k l i o, n p q o -> n h w c, k l i o',
}
# Per pass: which operands are batched (the rest replicated); which results are batched
# (True) or sums over the batch (False: psum over the batch's mesh axes).
_OPERANDS = {'forward': (True, False), 'backward': (True, False, True)}
_RESULTS = {'forward': True, 'backward': (True, False)}


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
  """`fn` (the 'forward' or 'backward' pass) partitioned over the batch axis under ``jax.jit``."""
  results = _RESULTS[kind]

  def shardings(mesh, arg_shapes):
    batch = _batch_axes(arg_shapes[0].sharding)
    spec = lambda batched: NamedSharding(mesh, P(batch) if batched else P())
    out = (spec(results) if isinstance(results, bool) else tuple(spec(r) for r in results))
    return batch, tuple(spec(b) for b in _OPERANDS[kind]), out

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes)[2]

  def partition(mesh, arg_shapes, result_shape):
    batch, args, out = shardings(mesh, arg_shapes)
    names = _axis_names(batch)

    def lower(*operands):
      y = fn(*operands)
      if isinstance(results, bool) or not names:
        return y
      return tuple(r if batched else jax.lax.psum(r, names) for r, batched in zip(y, results))
    return mesh, lower, out, args

  wrapped = custom_partitioning(fn)
  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=_RULES[kind])
  return wrapped
