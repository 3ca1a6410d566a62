"""Rewrites of jax2onnx's graph into the ONNX ops deployers and quantizers expect (same function):

* ``Max(x, 0)`` (JAX's relu) becomes ``Relu(x)``, which onnxruntime fuses into the Conv before it
  and its quantizer treats as part of that Conv;
* ``Gemm(a, b, 0) + bias`` (a dense layer) becomes ``Gemm(a, b, bias)``: onnxruntime's quantizer
  cannot quantize a Gemm whose bias is the scalar 0;
* the 3-D MaxPool over ``(N*C, H, W)`` that `onnx_model` makes of an NHWC max pool
  (Reshape, Unsqueeze, Unsqueeze, MaxPool, Squeeze, Reshape) becomes one 2-D MaxPool on the
  ``(N, C, H, W)`` tensor it reshaped.
"""
from __future__ import annotations

import numpy as np


def _consumers(graph) -> dict[str, list]:
  users: dict[str, list] = {}
  for node in graph.node:
    for name in node.input:
      users.setdefault(name, []).append(node)
  return users


def _constant(graph, name: str) -> np.ndarray | None:
  from onnx import numpy_helper
  for init in graph.initializer:
    if init.name == name:
      return numpy_helper.to_array(init)
  return None


def _attr(node, name: str, default=None):
  from onnx import helper
  for a in node.attribute:
    if a.name == name:
      return helper.get_attribute_value(a)
  return default


def _relu(graph) -> None:
  from onnx import helper
  for i, node in enumerate(graph.node):
    if node.op_type == 'Max' and len(node.input) == 2:
      zero = _constant(graph, node.input[1])
      if zero is not None and zero.size == 1 and float(zero.reshape(())) == 0.0:
        graph.node[i].CopyFrom(helper.make_node('Relu', [node.input[0]], list(node.output),
                                                name=node.name + '_relu'))


def _gemm_bias(graph) -> None:
  from onnx import numpy_helper
  users = _consumers(graph)
  for node in list(graph.node):
    if node.op_type != 'Gemm' or len(node.input) != 3:
      continue
    c = _constant(graph, node.input[2])
    if c is None or c.size != 1 or float(c.reshape(())) != 0.0:
      continue
    after = users.get(node.output[0], [])
    bias = _constant(graph, after[0].input[1]) if len(after) == 1 and \
        after[0].op_type == 'Add' and after[0].input[0] == node.output[0] else None
    if bias is None or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
      del node.input[2]  # no bias: C is optional
      continue
    name = node.name + '_bias'
    graph.initializer.append(numpy_helper.from_array(bias.reshape(-1), name))
    node.input[2] = name
    for a in node.attribute:
      if a.name == 'beta':  # jax2onnx scales its zero C by beta = 0
        a.f = 1.0
    node.output[0] = after[0].output[0]
    graph.node.remove(after[0])


def _max_pool_2d(graph) -> None:
  from onnx import helper
  producer = {out: node for node in graph.node for out in node.output}
  users = _consumers(graph)
  for pool in list(graph.node):
    kernel = _attr(pool, 'kernel_shape')
    if pool.op_type != 'MaxPool' or kernel is None or len(kernel) != 3 or kernel[0] != 1:
      continue
    chain, name = [], pool.input[0]
    for op in ('Unsqueeze', 'Unsqueeze', 'Reshape'):
      node = producer.get(name)
      if node is None or node.op_type != op:
        break
      chain.append(node)
      name = node.input[0]
    after = []
    for op in ('Squeeze', 'Reshape'):
      outs = users.get((after[-1] if after else pool).output[0], [])
      if len(outs) != 1 or outs[0].op_type != op:
        break
      after.append(outs[0])
    first_shape = _constant(graph, chain[-1].input[1]) if len(chain) == 3 else None
    last_shape = _constant(graph, after[-1].input[1]) if len(after) == 2 else None
    if first_shape is None or last_shape is None or first_shape.size != 3 or \
        last_shape.size != 4:
      continue
    strides = list(_attr(pool, 'strides', [1, 1, 1]))
    pads = list(_attr(pool, 'pads', [0] * 6))
    if strides[0] != 1 or pads[0] != 0 or pads[3] != 0:
      continue
    if any(len(users.get(n.output[0], [])) != 1 for n in chain):
      continue
    new = helper.make_node('MaxPool', [chain[-1].input[0]], [after[-1].output[0]],
                           name=pool.name + '_2d', kernel_shape=list(kernel[1:]),
                           strides=strides[1:], pads=[pads[1], pads[2], pads[4], pads[5]])
    index = list(graph.node).index(pool)
    for node in (*chain, *after):
      graph.node.remove(node)
    graph.node.remove(pool)
    graph.node.insert(index - len(chain), new)


def _drop_unused(graph) -> None:
  used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
  for init in [i for i in graph.initializer if i.name not in used]:
    graph.initializer.remove(init)


def tidy(model_bytes: bytes) -> bytes:
  """`model_bytes` with the three rewrites above applied (and initializers left unused
  removed)."""
  import onnx
  model = onnx.load_from_string(model_bytes)
  _relu(model.graph)
  _gemm_bias(model.graph)
  _max_pool_2d(model.graph)
  _drop_unused(model.graph)
  return model.SerializeToString()
