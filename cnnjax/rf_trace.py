"""Receptive fields of every array of a traced model: `cnnjax.summary`'s receptive-field column.

The model is traced to a jaxpr, and each array derived from the input image gets a `Field`: the
receptive field size and the jump (effective stride, in input pixels) along each spatial axis.
The input starts at size 1, jump 1. The rules (`cnnjax.shapes` has the same arithmetic):

* ``conv_general_dilated`` and ``reduce_window_*`` (pooling), per spatial axis with kernel ``k``,
  stride ``s`` and dilation ``d``: ``size += (k - 1) * d * jump`` and then ``jump *= s``.
* Element-wise ops, concatenation, padding, slicing and residual additions keep the spatial
  layout and take the largest size and jump over their inputs (the max over all paths; on a
  chain it is exact).
* Statistics over the batch (axis 0, as batch norm computes in training) count as constants,
  as in the receptive-field literature: they carry no field.
* Reductions over a spatial axis (global pooling), reshapes that mix spatial
  axes (flatten) and anything else not understood make the field *global*: it covers the whole
  feature map, ``size + (n - 1) * jump`` along an axis of length ``n``; its jump is None.
* Parameters, constants and RNG keys carry no field.

`mark` tags an array (a no-op ``optimization_barrier`` in a named scope) so that `trace` can
report that array's field; `cnnjax.summary` marks each layer's output.
"""
from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import jax
from jax.extend import core as jcore

MARK = 'cnnjax_rf_mark_'
_CALLS = {'pjit', 'jit', 'closed_call', 'core_call', 'custom_jvp_call', 'custom_vjp_call',
          'custom_vjp_call_jaxpr', 'checkpoint', 'remat', 'remat2'}
_REDUCTIONS = {'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod', 'reduce_and',
               'reduce_or', 'reduce_xor', 'argmax', 'argmin'}
_LAYOUT_KEEPING = {'concatenate', 'pad', 'slice', 'dynamic_slice', 'dynamic_update_slice', 'rev'}


class Field(NamedTuple):
  """``size`` and ``jump`` per input spatial axis (H, W); ``axes``: where they live in the array
  (``()`` and ``jump=None`` once the field is global)."""
  size: tuple
  jump: tuple | None
  axes: tuple


def mark(x: jax.Array, index: int) -> jax.Array:
  """Returns ``x`` unchanged, tagged so that `trace` reports its field under ``index``."""
  with jax.named_scope(f'{MARK}{index}'):
    return jax.lax.optimization_barrier(x)


def _global(f: Field, shape) -> Field:
  if f.jump is None:
    return f
  return Field(tuple(r + (shape[a] - 1) * j for r, j, a in zip(f.size, f.jump, f.axes)), None, ())


def _merge(items) -> Field:
  """Max over ``(field, shape)`` pairs; global unless all share one spatial layout."""
  fields = [f for f, _ in items]
  if all(f.jump is not None and f.axes == fields[0].axes for f in fields):
    return Field(tuple(map(max, zip(*(f.size for f in fields)))),
                 tuple(map(max, zip(*(f.jump for f in fields)))), fields[0].axes)
  fields = [_global(f, shape) for f, shape in items]
  return Field(tuple(map(max, zip(*(f.size for f in fields)))), None, ())


def _window(f: Field, shape, kernel, stride, dilation, base_dilation, in_axes, out_axes):
  """Applies a sliding window whose spatial dims ``in_axes[i]`` have ``kernel[i]`` etc."""
  if f.jump is None:
    return f
  size, jump, axes = list(f.size), list(f.jump), list(f.axes)
  for k, (a, r, j) in enumerate(zip(f.axes, f.size, f.jump)):
    if a not in in_axes:
      return _global(f, shape)
    i = in_axes.index(a)
    j = Fraction(j, base_dilation[i])
    j = int(j) if j.denominator == 1 else j
    size[k] = r + (kernel[i] - 1) * dilation[i] * j
    jump[k] = j * stride[i]
    axes[k] = out_axes[i]
  return Field(tuple(size), tuple(jump), tuple(axes))


def _remap(f: Field, shape, new_axis) -> Field:
  """Moves the spatial axes with ``new_axis(a)`` (None: that axis is gone, so go global)."""
  if f.jump is None:
    return f
  axes = tuple(new_axis(a) for a in f.axes)
  return _global(f, shape) if None in axes else Field(f.size, f.jump, axes)


def _reshape_axis(in_shape, out_shape):
  """Axis map of a reshape that only adds or drops unit dims (else every axis is lost)."""
  old = [a for a, n in enumerate(in_shape) if n != 1]
  new = [a for a, n in enumerate(out_shape) if n != 1]
  if [in_shape[a] for a in old] != [out_shape[a] for a in new]:
    return lambda a: None
  return dict(zip(old, new)).get


def _rule(eqn, ins, marks):
  """Fields of ``eqn``'s outputs from the fields of its inputs."""
  name, params = eqn.primitive.name, eqn.params
  shapes = [getattr(v.aval, 'shape', ()) for v in eqn.invars]
  out_shape = getattr(eqn.outvars[0].aval, 'shape', ())
  n_out = len(eqn.outvars)
  if name in _CALLS:
    sub = next((params[k] for k in ('jaxpr', 'call_jaxpr', 'fun_jaxpr') if k in params), None)
    sub = getattr(sub, 'jaxpr', sub)
    if sub is not None and len(sub.invars) == len(ins):
      env = {v: f for v, f in zip(sub.invars, ins) if f is not None}
      _run(sub, env, marks)
      return [None if isinstance(v, jcore.Literal) else env.get(v) for v in sub.outvars]
  data = [(f, s) for f, s in zip(ins, shapes) if f is not None]
  if not data:
    return [None] * n_out
  if name == 'optimization_barrier':
    scope = str(eqn.source_info.name_stack).rsplit('/', 1)[-1]
    if scope.startswith(MARK) and ins[0] is not None:
      marks[int(scope[len(MARK):])] = ins[0]
    return list(ins)
  f, shape = data[0]
  if name == 'conv_general_dilated' and ins[0] is not None and ins[1] is None:
    dn = params['dimension_numbers']
    rhs = shapes[1]
    kernel = [rhs[a] for a in dn.rhs_spec[2:]]
    field = _window(f, shape, kernel, params['window_strides'], params['rhs_dilation'],
                    params['lhs_dilation'], list(dn.lhs_spec[2:]), list(dn.out_spec[2:]))
  elif name.startswith('reduce_window') and len(data) == 1 and ins[0] is not None:
    axes = list(range(len(shape)))
    field = _window(f, shape, params['window_dimensions'], params['window_strides'],
                    params['window_dilation'], params['base_dilation'], axes, axes)
  elif name in _REDUCTIONS and len(data) == 1:
    gone = tuple(params['axes'])
    if 0 in gone and f.jump is not None and 0 not in f.axes:
      return [None] * n_out  # batch statistics: constants, as in the receptive-field literature
    field = _remap(f, shape, lambda a: None if a in gone else a - sum(r < a for r in gone))
  elif name == 'broadcast_in_dim' and len(data) == 1:
    field = _remap(f, shape, lambda a: params['broadcast_dimensions'][a])
  elif name == 'transpose' and len(data) == 1:
    field = _remap(f, shape, lambda a: tuple(params['permutation']).index(a))
  elif name in ('reshape', 'squeeze', 'expand_dims') and len(data) == 1:
    field = _remap(f, shape, _reshape_axis(shape, out_shape))
  elif name == 'dot_general' and len(data) == 1:
    (contract_l, contract_r), (batch_l, batch_r) = params['dimension_numbers']
    side = 0 if ins[0] is not None else 1
    free = [[a for a in range(len(shapes[s])) if a not in (contract_l, contract_r)[s]
             and a not in (batch_l, batch_r)[s]] for s in (0, 1)]
    offset = len(batch_l) + (len(free[0]) if side else 0)
    field = _remap(f, shape, lambda a: offset + free[side].index(a) if a in free[side] else None)
  elif name in _LAYOUT_KEEPING or all(s == out_shape for _, s in data):
    field = _merge(data)
  else:
    field = _merge([(_global(f, s), s) for f, s in data])
  return [field] * n_out


def _run(jaxpr, env, marks) -> None:
  for eqn in jaxpr.eqns:
    ins = [None if isinstance(v, jcore.Literal) else env.get(v) for v in eqn.invars]
    for v, f in zip(eqn.outvars, _rule(eqn, ins, marks)):
      if f is not None:
        env[v] = f


def trace(jaxpr, input_index: int) -> dict[int, Field]:
  """Fields of the arrays tagged by `mark` in ``jaxpr`` (an open jaxpr), by tag index.

  ``jaxpr.invars[input_index]`` is the NHWC input image (field size 1, jump 1 on axes 1, 2).
  """
  env = {jaxpr.invars[input_index]: Field((1, 1), (1, 1), (1, 2))}
  marks: dict[int, Field] = {}
  _run(jaxpr, env, marks)
  return marks


__all__ = ['Field', 'mark', 'trace']
