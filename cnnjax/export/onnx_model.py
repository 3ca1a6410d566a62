"""ONNX through jax2onnx, run with onnxruntime: a dynamic batch dimension, NHWC or NCHW input.

The default input layout is NHWC, the JAX model's own (``(N, H, W, C)`` float32, normalized);
``layout='nchw'`` makes the graph take PyTorch's ``(N, C, H, W)`` and transpose it first.
The batch dimension is symbolic (``N``), so any batch size runs. After conversion onnxruntime's
basic graph optimizations are applied once and saved: constants are folded, and each eval-mode
BatchNorm (a per-channel multiply and add on the running statistics) is folded into the
convolution before it, so the file holds plain Conv layers.

jax2onnx traces the model to lax primitives; the model is first traced here, outside jax2onnx's
patches of Flax (which replace ``flax.linen.max_pool`` by a keyword-only version), and its
windowed reductions are rewritten into forms onnxruntime runs: an NHWC max pool as a 3-D MaxPool
over ``(N*C, H, W)``, a windowed sum (average pooling) as a depthwise convolution with a kernel
of ones (and JAX's ``stack`` / ``unstack`` primitives as concatenations / slices). All compute
the same function. `cnnjax.export.onnx_tidy` then turns jax2onnx's relu,
dense and pooling patterns into plain Relu, Gemm and 2-D MaxPool nodes.
"""
from __future__ import annotations

import importlib.metadata
import logging
import pathlib
import tempfile
from typing import Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from cnnjax.errors import ConfigError, ExportError
from cnnjax.export import onnx_tidy
from cnnjax.export.check import forward, require
from cnnjax.export.stablehlo import batch_polymorphic
from cnnjax.fast_paths import cpu_fast_paths

LAYOUTS = ('nhwc', 'nchw')
OPSET = 21
_CALLS = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call', 'custom_vjp_call',
          'custom_vjp_call_jaxpr', 'remat', 'checkpoint')


def _sub_jaxpr(eqn) -> jex.core.ClosedJaxpr | None:
  """The body of a call-like equation (jit, custom_jvp, remat), to be inlined."""
  if eqn.primitive.name not in _CALLS:
    return None
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    body = eqn.params.get(key)
    if isinstance(body, jex.core.ClosedJaxpr):
      return body
    if isinstance(body, jex.core.Jaxpr):
      return jex.core.ClosedJaxpr(body, ())
  return None


def _nhwc_window(params, ndim: int) -> bool:
  """Whether a reduce_window pools H and W of an NHWC tensor (batch and channels untouched)."""
  window, strides, padding = (params['window_dimensions'], params['window_strides'],
                              params['padding'])
  dilated = any(d != 1 for d in (*params.get('base_dilation', ()),
                                 *params.get('window_dilation', ())))
  return (ndim == 4 and not dilated and window[0] == window[3] == 1
          and strides[0] == strides[3] == 1 and tuple(padding[0]) == tuple(padding[3]) == (0, 0))


def _max_pool(x, params):
  """An NHWC max pool as a max pool of ``(N*C, H, W)``: a 3-D ONNX MaxPool after jax2onnx."""
  n, h, w, c = x.shape
  window, strides, padding = (params['window_dimensions'], params['window_strides'],
                              params['padding'])
  y = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w)
  y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, *window[1:3]), (1, *strides[1:3]),
                            ((0, 0), *padding[1:3]))
  return jnp.transpose(y.reshape(n, c, *y.shape[1:]), (0, 2, 3, 1))


def _window_sum(x, params):
  """An NHWC windowed sum as a depthwise convolution with a kernel of ones."""
  c = x.shape[3]
  window, strides, padding = (params['window_dimensions'], params['window_strides'],
                              params['padding'])
  kernel = jnp.ones((*window[1:3], 1, c), x.dtype)
  return jax.lax.conv_general_dilated(x, kernel, tuple(strides[1:3]), tuple(padding[1:3]),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=c)


def _stack(arrays, axis: int):
  """jnp.stack's primitive (JAX 0.10+), which jax2onnx lacks, as concatenated expand_dims."""
  return jax.lax.concatenate([jax.lax.expand_dims(a, (axis,)) for a in arrays], axis)


def _unstack(x, axis: int):
  """jnp.unstack's primitive (JAX 0.12), which jax2onnx lacks, as slices."""
  return [jax.lax.squeeze(jax.lax.slice_in_dim(x, i, i + 1, axis=axis), (axis,))
          for i in range(x.shape[axis])]


_REWRITES = {'reduce_window_max': _max_pool, 'reduce_window_sum': _window_sum}


def onnx_friendly(closed: jex.core.ClosedJaxpr):
  """A function evaluating `closed` primitive by primitive, call bodies inlined and pools
  rewritten (`_REWRITES`), so that jax2onnx sees only lax primitives it lowers well."""
  def run(jaxpr, consts, args):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]  # noqa: E731
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      body = _sub_jaxpr(eqn)
      rewrite = _REWRITES.get(eqn.primitive.name)
      if body is not None:
        outs = run(body.jaxpr, body.consts, ins)
      elif rewrite is not None and _nhwc_window(eqn.params, ins[0].ndim):
        outs = [rewrite(ins[0], eqn.params)]
      elif eqn.primitive.name == 'stack':
        outs = [_stack(ins, eqn.params['axis'])]
      elif eqn.primitive.name == 'unstack':
        outs = _unstack(ins[0], eqn.params['axis'])
      else:
        outs = eqn.primitive.bind(*ins, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]
  return lambda *args: run(closed.jaxpr, closed.consts, args)[0]


def primitives(closed: jex.core.ClosedJaxpr) -> set[str]:
  """The names of the primitives jax2onnx will see: those of `closed`, call bodies inlined."""
  names = set()
  for eqn in closed.jaxpr.eqns:
    body = _sub_jaxpr(eqn)
    names |= primitives(body) if body is not None else {eqn.primitive.name}
  rewritten = {'stack': 'concatenate', 'unstack': 'slice'}
  return {rewritten.get(n, n) for n in names}


def _check_supported(closed: jex.core.ClosedJaxpr, name: str) -> None:
  """Raises ExportError naming the ops of the model that jax2onnx has no conversion for."""
  from jax2onnx.plugins import plugin_system
  plugin_system.import_all_plugins()
  missing = sorted(primitives(closed) - set(plugin_system.PLUGIN_REGISTRY))
  if missing:
    version = importlib.metadata.version('jax2onnx')
    raise ExportError(f'jax2onnx {version} cannot convert {name}: it has no ONNX conversion for '
                      f'the op{"s" if len(missing) > 1 else ""} {", ".join(missing)}.')


def _unsupported(error: Exception, name: str) -> ExportError:
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return ExportError(f'jax2onnx cannot convert {name}: {text[:300]}.')


def export(model, variables, input_shape: Sequence[int], layout: str = 'nhwc',
           name: str = 'model') -> bytes:
  """The eval-mode model as a serialized ONNX model: input 'image' (dynamic batch), output
  'logits'; BatchNorm folded into the convolutions by onnxruntime's basic optimizations."""
  if layout not in LAYOUTS:
    raise ConfigError(f"the ONNX input layout must be one of {', '.join(LAYOUTS)}, got "
                      f"'{layout}'.")
  jax2onnx = require('jax2onnx', 'ONNX export')
  require('onnx', 'ONNX export')
  spec = batch_polymorphic(input_shape)
  with cpu_fast_paths(False):
    closed = jax.make_jaxpr(forward(model, variables))(spec)
  # jax2onnx's plugin loader logs tracebacks of plugins for other libraries; onnx_ir warns
  # about shape values it does not serialize.
  loggers = [logging.getLogger(n) for n in ('jax2onnx', 'onnx_ir')]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    _check_supported(closed, name)
    proto = jax2onnx.to_onnx(onnx_friendly(closed), [spec], model_name=name, opset=OPSET,
                             input_names=['image'], output_names=['logits'],
                             inputs_as_nchw=[0] if layout == 'nchw' else None)
  except (NotImplementedError, TypeError, ValueError, KeyError) as e:
    raise _unsupported(e, name) from e
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)
  return optimize(onnx_tidy.tidy(optimize(proto.SerializeToString())))


def optimize(model_bytes: bytes) -> bytes:
  """`model_bytes` after onnxruntime's basic (portable) graph optimizations: constant folding,
  Conv + Mul/Add (eval-mode BatchNorm) fusion, redundant transposes removed."""
  ort = require('onnxruntime', 'ONNX export')
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / 'optimized.onnx'
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3  # not its notes on the initializers it drops
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(model_bytes, options, providers=['CPUExecutionProvider'])
    return out.read_bytes()


def session(path_or_bytes, threads: int = 0):
  """An onnxruntime CPU session of a saved model (all graph optimizations on)."""
  ort = require('onnxruntime', 'running an ONNX model')
  options = ort.SessionOptions()
  options.log_severity_level = 3
  if threads:
    options.intra_op_num_threads = threads
  source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
  return ort.InferenceSession(source, options, providers=['CPUExecutionProvider'])


def runner(path_or_bytes, layout: str = 'nhwc'):
  """A function NHWC batch -> logits running the ONNX model (transposing for an NCHW model)."""
  sess = session(path_or_bytes)
  name = sess.get_inputs()[0].name

  def run(x: np.ndarray) -> np.ndarray:
    if layout == 'nchw':
      x = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    return sess.run(None, {name: x.astype(np.float32, copy=False)})[0]
  return run
