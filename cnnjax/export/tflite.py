"""TFLite (LiteRT) flatbuffers by the route LiteRT documents for JAX: jax2tf, then TensorFlow's
TFLiteConverter.

`jax.experimental.jax2tf.convert` wraps the eval-mode model (batch-polymorphic ``(b, H, W, C)``
float32 input, the model serialized as StableHLO inside the TensorFlow function) into a
``tf.function``; ``tf.lite.TFLiteConverter.from_concrete_functions`` lowers it to TFLite's
builtin ops. The flatbuffer's input is NHWC (TFLite's own layout) with batch size -1 in its
shape signature. It runs with LiteRT's interpreter (`ai_edge_litert`), else TensorFlow's.

Needs TensorFlow (``pip install tensorflow-cpu``), which has wheels for Linux, macOS and Windows
on x86-64 and for Linux and macOS on ARM64, but not for every new Python at once: where pip finds
none, this export says so and the other formats still work. With JAX 0.12 (Python 3.12+) and
TensorFlow 2.21, the newest pair pip gives there, the converter cannot read the StableHLO JAX
writes and leaves it as an unconvertible ``tf.XlaCallModule`` op: the export says so in one
sentence (checked 2026-12-01). In a process that also uses
torchvision, import torchvision before this module runs (torchvision imported after TensorFlow
crashes the interpreter with the tensorflow-cpu 2.21 / torchvision 0.29 wheels).
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np

from cnnjax.errors import ExportError
from cnnjax.export.check import forward, require
from cnnjax.fast_paths import cpu_fast_paths


def _tensorflow():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  return require('tensorflow', 'TFLite export')


def export(model, variables, input_shape: Sequence[int]) -> bytes:
  """The eval-mode model as a TFLite flatbuffer with input (-1, *input_shape) float32."""
  tf = _tensorflow()
  try:
    from jax.experimental import jax2tf
  except ImportError as e:
    raise ExportError(f'TFLite export needs jax.experimental.jax2tf, which this JAX does not '
                      f'provide ({e}).') from None
  shape = tuple(int(d) for d in input_shape)
  polymorphic = '(b, ' + ', '.join(str(d) for d in shape) + ')'
  with cpu_fast_paths(False):
    function = tf.function(
        jax2tf.convert(forward(model, variables), polymorphic_shapes=[polymorphic],
                       with_gradient=False),
        autograph=False, input_signature=[tf.TensorSpec((None, *shape), tf.float32, 'image')])
    concrete = function.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], function)
  try:
    return converter.convert()
  except Exception as e:  # pylint: disable=broad-except  (the converter raises ConverterError)
    if 'XlaCallModule' in str(e):
      raise ExportError(route_unavailable(tf.__version__)) from None
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ExportError(f'the TFLite converter cannot convert this model: {text[:300]}.') from None


def route_unavailable(tf_version: str) -> str:
  """The sentence for a JAX whose StableHLO this TensorFlow's TFLite converter cannot read."""
  import jax
  return (f'TFLite export does not work with JAX {jax.__version__} and TensorFlow {tf_version}: '
          f'the TFLite converter cannot read the StableHLO this JAX writes (it leaves '
          f'tf.XlaCallModule unconverted); JAX 0.10 with TensorFlow 2.21 (Python 3.11) works.')


def interpreter(model_content: bytes):
  """A LiteRT interpreter of the flatbuffer (ai_edge_litert if installed, else TensorFlow's)."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    Interpreter = None  # pylint: disable=invalid-name
  if Interpreter is None:
    tf = _tensorflow()
    with warnings.catch_warnings():  # tf.lite.Interpreter says it moves to ai_edge_litert
      warnings.simplefilter('ignore')
      return tf.lite.Interpreter(model_content=model_content)
  return Interpreter(model_content=model_content)


def runner(model_content: bytes):
  """A function NHWC batch -> logits running the flatbuffer (resized to each new batch size)."""
  interp = interpreter(model_content)
  inp = interp.get_input_details()[0]
  out = interp.get_output_details()[0]
  state = {'shape': None}

  def run(x: np.ndarray) -> np.ndarray:
    if state['shape'] != x.shape:
      interp.resize_tensor_input(inp['index'], list(x.shape), strict=True)
      interp.allocate_tensors()
      state['shape'] = x.shape
    interp.set_tensor(inp['index'], np.ascontiguousarray(x, np.float32))
    interp.invoke()
    return interp.get_tensor(out['index']).copy()
  return run
