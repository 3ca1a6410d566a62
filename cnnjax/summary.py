"""`summary(model, input_shape)`: a Keras/torchinfo-style table of a model's layers.

Each call of a `cnnjax.layers` module becomes one row: its path, type, output shape, parameters,
multiply-accumulates (MACs) and the receptive field (size and jump) of its output. Nothing is
computed on real arrays: the model is traced abstractly (`jax.eval_shape` / `jax.make_jaxpr`),
so VGG-16's 138M parameters are never allocated.

How each column is obtained:

* Rows, shapes and parameters come from intercepting the layer calls (`flax.linen.intercept_methods`).
* MACs count convolutions and linear layers only (``kernel volume * output size``, no bias), the
  convention of fvcore and torchvision's model tables. They are for the whole input batch given.
* Receptive fields are propagated through the model's jaxpr: each array carries a field size and
  jump per spatial axis (`cnnjax.shapes.receptive_fields` rules for ``conv_general_dilated`` and
  ``reduce_window``); element-wise ops, concatenation and residual additions take the maximum
  over their inputs, so on branching models (Inception, ResNet) the field of a layer is the
  largest over all paths leading to it. Batch statistics (training-mode batch norm) count as
  constants. Reductions over height and width (global pooling, a flatten before a linear layer)
  make the field global: it
  then covers the whole feature map, ``size + (H - 1) * jump``, and the jump is shown as ``-``.
  Sizes are not clipped to the input image (the usual convention in published tables).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import fast_paths, layers, rf_trace
from cnnjax.errors import ShapeError

LAYER_TYPES = (layers.Conv2d, layers.Linear, layers.MaxPool2d, layers.AvgPool2d,
               layers.GlobalAvgPool, layers.BatchNorm, nn.Dropout)


@dataclasses.dataclass
class Row:
  """One layer call: ``rf`` and ``jump`` are per-axis tuples (``jump`` None once global)."""
  path: str
  type: str
  output_shape: tuple[int, ...]
  params: int
  macs: int
  rf: tuple[int, ...] | None = None
  jump: tuple[Any, ...] | None = None


@dataclasses.dataclass
class Summary:
  """The table of `summary`; ``str(summary)`` renders it."""
  rows: list[Row]
  total_params: int        # every leaf of the `params` collection
  total_macs: int          # sum over the rows
  other_params: int        # parameters outside cnnjax.layers modules (shown when non-zero)
  batch_stats: int         # non-trainable state (BatchNorm running mean and variance)
  input_shape: tuple[int, ...]

  def __str__(self) -> str:
    def axes(values):
      if values is None:
        return '-'
      values = [int(v) if float(v).is_integer() else round(float(v), 2) for v in values]
      return str(values[0]) if len(set(values)) == 1 else 'x'.join(map(str, values))
    header = ('Layer (path)', 'Type', 'Output shape', 'Params', 'MACs', 'RF', 'Jump')
    table = [header] + [
        (r.path, r.type, str(r.output_shape), f'{r.params:,}', f'{r.macs:,}', axes(r.rf),
         axes(r.jump)) for r in self.rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = {3, 4, 5, 6}

    def fmt(line):
      return '  '.join(c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip()
    rule = '=' * len(fmt(header))
    lines = [f'Input shape: {self.input_shape}', rule, fmt(header), rule]
    lines += [fmt(line) for line in table[1:]]
    lines += [rule, f'Total params: {self.total_params:,}']
    if self.other_params:
      lines.append(f'  of which outside cnnjax.layers: {self.other_params:,}')
    lines += [f'Non-trainable state (batch_stats): {self.batch_stats:,}',
              f'Total MACs: {self.total_macs:,} ({self.total_macs / 1e9:.3f} G)', rule]
    return '\n'.join(lines)


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _macs(module: nn.Module, params, out_shape: Sequence[int]) -> int:
  """Conv: output elements * kernel volume per output; linear: output elements * in features."""
  if isinstance(module, layers.Conv2d):
    kh, kw, cin_per_group, _ = params['kernel'].shape
    return math.prod(out_shape) * kh * kw * cin_per_group
  if isinstance(module, layers.Linear):
    return math.prod(out_shape) * params['kernel'].shape[0]
  return 0


def summary(model: nn.Module, input_shape: Sequence[int], *, variables=None,
            dtype=jnp.float32, print_fn: Callable[[str], Any] | None = print,
            **call_kwargs) -> Summary:
  """Prints and returns a per-layer table of ``model`` applied to an input of ``input_shape``.

  Args:
    model: a Flax module built from `cnnjax.layers`.
    input_shape: ``(H, W, C)`` (a batch of one) or ``(N, H, W, C)``.
    variables: the model's variables if you have them; by default the model is initialized
      abstractly (traced with ``jax.make_jaxpr``: nothing is allocated).
    dtype: input dtype.
    print_fn: where the table goes (``None``: don't print).
    **call_kwargs: passed to the model's ``__call__`` (e.g. ``train=False``, the usual default).

  Returns:
    A `Summary`: ``rows``, ``total_params``, ``total_macs``; ``str()`` gives the table.
  """
  input_shape = tuple(int(s) for s in input_shape)
  if len(input_shape) == 3:
    input_shape = (1,) + input_shape
  if len(input_shape) != 4:
    raise ShapeError(f'input_shape must be (H, W, C) or (N, H, W, C), got {input_shape}.')
  x = jax.ShapeDtypeStruct(input_shape, dtype)
  key = jax.random.key(0)
  rows: list[Row] = []
  seen: set[str] = set()

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, LAYER_TYPES):
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    path = '/'.join(module.path)
    params = module.variables.get('params', {})
    count = 0 if path in seen else _count(params)
    seen.add(path)
    rows.append(Row(path, type(module).__name__, tuple(out.shape), count,
                    _macs(module, params, out.shape)))
    return rf_trace.mark(out, len(rows) - 1)

  if variables is None:  # one abstract init pass gives the rows and the variables' shapes
    def forward(rngs, x):
      with nn.intercept_methods(intercept):
        return model.init_with_output(rngs, x, **call_kwargs)
    first = {'params': key, 'dropout': key}
  else:
    def forward(variables, x):
      with nn.intercept_methods(intercept):
        return model.apply(variables, x, rngs={'dropout': key}, mutable=['batch_stats'],
                           **call_kwargs)
    first = variables
  with fast_paths.cpu_fast_paths(False):  # plain convs and pools, which the rf trace understands
    jaxpr, (_, state) = jax.make_jaxpr(forward, return_shape=True)(first, x)
  if variables is None:
    variables = state
  fields = rf_trace.trace(jaxpr.jaxpr, len(jax.tree.leaves(first)))
  for i, row in enumerate(rows):
    if i in fields:
      row.rf, row.jump = fields[i].size, fields[i].jump
  total = _count(variables.get('params', {}))
  result = Summary(rows=rows, total_params=total, total_macs=sum(r.macs for r in rows),
                   other_params=total - sum(r.params for r in rows),
                   batch_stats=_count(variables.get('batch_stats', {})), input_shape=input_shape)
  if print_fn is not None:
    print_fn(str(result))
  return result


__all__ = ['summary', 'Summary', 'Row', 'LAYER_TYPES']
