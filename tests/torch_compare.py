"""Helpers shared by the torchvision comparison tests (test_blocks.py, test_models.py).

Copy a torch module's weights into a Flax variable tree by the naming rule documented in
cnnjax/models/common.py (Sequential indices joined by '_', other dots become scopes), and compare
outputs in eval and train mode.
"""
from __future__ import annotations

from functools import partial
import importlib.util
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ATOL = RTOL = 1e-4


def import_torch():
  """torch and torchvision, or a skip (also when TensorFlow is loaded: importing torchvision
  after TensorFlow crashes this interpreter)."""
  for name in ('torch', 'torchvision'):
    if importlib.util.find_spec(name) is None:
      pytest.skip(f'{name} is not installed (pip install -e ".[torch]")')
  if 'tensorflow' in sys.modules and 'torchvision' not in sys.modules:
    pytest.skip('torchvision cannot be imported after tensorflow in one process')
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  return torch


def torch_to_flax(module, as_shapes: bool = False) -> dict:
  """Flax variables for a torch module's state_dict by the mechanical naming rule.

  With ``as_shapes`` the leaves are ShapeDtypeStructs (works for modules on the 'meta' device).
  """
  torch = sys.modules['torch']
  kinds = dict(module.named_modules())
  variables = {'params': {}, 'batch_stats': {}}

  def put(collection, path, tensor, perm=None):
    perm = perm or tuple(range(tensor.ndim))
    if as_shapes:
      value = jax.ShapeDtypeStruct(tuple(tensor.shape[p] for p in perm), jnp.float32)
    else:
      value = jnp.asarray(tensor.detach().cpu().numpy().transpose(perm))
    node = variables[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    assert path[-1] not in node, path
    node[path[-1]] = value

  for key, tensor in module.state_dict().items():
    owner, leaf = key.rsplit('.', 1)
    if leaf == 'num_batches_tracked':
      continue
    path = re.sub(r'\.(\d+)', r'_\1', owner).split('.')
    kind = kinds[owner]
    if leaf == 'layer_scale':  # ConvNeXt's (C, 1, 1) parameter is (C,) here
      put('params', path + ['layer_scale'], tensor.reshape(-1))
    elif isinstance(kind, torch.nn.LayerNorm):
      put('params', path + [{'weight': 'scale', 'bias': 'bias'}[leaf]], tensor)
    elif isinstance(kind, torch.nn.Conv2d):
      if leaf == 'weight':
        put('params', path + ['kernel'], tensor, (2, 3, 1, 0))
      else:
        put('params', path + ['bias'], tensor)
    elif isinstance(kind, torch.nn.Linear):
      if leaf == 'weight':
        put('params', path + ['kernel'], tensor, (1, 0))
      else:
        put('params', path + ['bias'], tensor)
    elif isinstance(kind, torch.nn.BatchNorm2d):
      collection = 'params' if leaf in ('weight', 'bias') else 'batch_stats'
      name = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
      put(collection, path + [name[leaf]], tensor)
    else:
      raise AssertionError(f'unexpected parameter {key} of {type(kind).__name__}')
  if not variables['batch_stats']:
    del variables['batch_stats']
  return variables


def randomize_bn(module) -> None:
  """Non-trivial BN affine parameters and running statistics, so eval mode is a real test."""
  torch = sys.modules['torch']
  gen = torch.Generator().manual_seed(0)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _to_nhwc(y: np.ndarray) -> np.ndarray:
  return y.transpose(0, 2, 3, 1) if y.ndim == 4 else y


def compare(torch_module, flax_module, x_nhwc: np.ndarray, *, train_too: bool = True):
  """Asserts equal eval outputs, and in training equal outputs and running-stat updates.

  Returns the Flax variables copied from ``torch_module`` (with its eval-mode statistics).
  """
  torch = sys.modules['torch']
  randomize_bn(torch_module)
  variables = torch_to_flax(torch_module)
  # Every flax variable must come from torch: shapes and names match exactly.
  flax_shapes = jax.eval_shape(flax_module.init, jax.random.key(0), x_nhwc)
  chex.assert_trees_all_equal_shapes(flax_shapes, variables)
  x_torch = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())

  torch_module.eval()
  with torch.no_grad():
    expected = _to_nhwc(torch_module(x_torch).numpy())
  got = jax.jit(partial(flax_module.apply, train=False))(variables, x_nhwc)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
  if not train_too:
    return variables
  torch_module.train()
  with torch.no_grad():
    expected = _to_nhwc(torch_module(x_torch).numpy())
  got, updates = jax.jit(partial(flax_module.apply, train=True, mutable=['batch_stats']))(
      variables, x_nhwc)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
  new_stats = torch_to_flax(torch_module).get('batch_stats', {})
  chex.assert_trees_all_close(updates.get('batch_stats', {}), new_stats, atol=ATOL, rtol=RTOL)
  return variables


def init_key(seed: int = 0) -> jax.Array:
  """A key whose init compiles fast: XLA:CPU compiles 'rbg' in a fraction of threefry's time."""
  return jax.random.key(seed, impl='rbg')


def random_input(shape) -> np.ndarray:
  return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def torchvision_on_meta(name: str, **kwargs):
  """torchvision model ``name`` on torch's 'meta' device (shapes only, nothing allocated).

  RegNet's builder computes its stage widths with torch ops (``.tolist()``), which cannot run on
  meta tensors: that one step runs on the CPU.
  """
  torch = sys.modules['torch']
  import torchvision.models as tvm
  from torchvision.models.regnet import BlockParams
  design = BlockParams.__dict__['from_init_params'].__func__

  def on_cpu(cls, *args, **kw):
    with torch.device('cpu'):
      return design(cls, *args, **kw)
  BlockParams.from_init_params = classmethod(on_cpu)
  try:
    with torch.device('meta'):
      return getattr(tvm, name)(**kwargs)
  finally:
    BlockParams.from_init_params = classmethod(design)
