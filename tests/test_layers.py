"""cnnjax.layers against the NumPy reference (cnnjax.reference) and, where installed, PyTorch.

Every case is computed once by Flax (cached) and compared with both oracles, float32, tight
tolerances. Bad inputs must raise one clear ValueError before XLA sees them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import fast_paths, layers
from cnnjax import reference

TOL = dict(rtol=1e-5, atol=1e-5)

# (in_channels, features, kernel, stride, padding, dilation, groups, bias, (H, W))
CONV_CASES = [
    (3, 5, 3, 1, 0, 1, 1, True, (9, 10)),
    (3, 5, 3, 1, 1, 1, 1, False, (9, 10)),
    (4, 6, 3, 2, 1, 1, 1, True, (9, 10)),                  # stride 2, symmetric like PyTorch
    (4, 6, (3, 5), (2, 1), (1, 2), 1, 1, True, (9, 10)),   # pair kernel, stride, padding
    (4, 6, 3, 2, ((0, 1), (1, 0)), 1, 1, True, (8, 8)),    # per-side padding
    (4, 6, 4, 1, 'same', 1, 1, True, (7, 8)),               # even kernel: extra pixel bottom/right
    (4, 6, 3, 1, 'same', 2, 1, True, (9, 10)),              # 'same' with dilation
    (4, 6, 5, 1, 'valid', 1, 1, True, (9, 10)),
    (4, 6, 3, 1, 2, 2, 1, True, (9, 10)),                   # dilation
    (4, 6, 3, 2, 1, (2, 1), 1, False, (11, 9)),             # dilation pair with stride
    (4, 6, 3, 1, 1, 1, 2, True, (9, 10)),                   # groups
    (6, 6, 3, 1, 1, 1, 6, True, (9, 10)),                   # depthwise
    (4, 8, 3, 2, 1, 1, 4, False, (9, 10)),                  # depthwise, multiplier 2
    (8, 4, 1, 1, 0, 1, 1, True, (5, 5)),                    # 1x1
    (3, 4, 7, 2, 3, 1, 1, False, (16, 16)),                 # a ResNet stem, scaled down
]


def _random(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _conv(case_id):
  """Returns (x, kernel, bias, flax output) for CONV_CASES[case_id]."""
  cin, feat, k, s, p, d, g, bias, hw = CONV_CASES[case_id]
  x = _random((2, *hw, cin), case_id)
  module = layers.Conv2d(feat, kernel_size=k, stride=s, padding=p, dilation=d, groups=g,
                         use_bias=bias)
  kernel = _random((*layers.pair(k), cin // g, feat), 50 + case_id)
  conv = {'kernel': kernel, 'bias': _random((feat,), 80 + case_id)} if bias else {'kernel': kernel}
  y = np.asarray(module.apply({'params': conv}, x))
  b = conv['bias'] if bias else None
  return x, kernel, b, y


def _torch_nchw(torch, x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize('case_id', range(len(CONV_CASES)))
def test_conv_matches_reference(case_id):
  cin, feat, k, s, p, d, g, bias, hw = CONV_CASES[case_id]
  x, kernel, b, y = _conv(case_id)
  expected = reference.conv2d(x, kernel, b, stride=s, padding=p, dilation=d, groups=g)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, **TOL)


@pytest.mark.parametrize('case_id', range(len(CONV_CASES)))
def test_conv_matches_torch(case_id):
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  cin, feat, k, s, p, d, g, bias, hw = CONV_CASES[case_id]
  x, kernel, b, y = _conv(case_id)
  xt = _torch_nchw(torch, x)
  if isinstance(p, str) or isinstance(p, int) or isinstance(p[0], int):
    padding = p  # PyTorch understands these itself, 'same' included
  else:
    (top, bottom), (left, right) = p
    xt, padding = F.pad(xt, (left, right, top, bottom)), 0
  wt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
  bt = None if b is None else torch.from_numpy(b)
  out = F.conv2d(xt, wt, bt, stride=s, padding=padding, dilation=d, groups=g)
  np.testing.assert_allclose(y, out.numpy().transpose(0, 2, 3, 1), **TOL)


# (kind, kernel, stride, padding, ceil_mode, count_include_pad, (H, W))
POOL_CASES = [
    ('max', 2, None, 0, False, True, (8, 8)),
    ('max', 3, 2, 1, False, True, (9, 10)),          # ResNet's stem pool
    ('max', 3, 2, 0, True, True, (8, 9)),            # ceil_mode adds a last partial window
    ('max', 2, 2, 1, True, True, (5, 5)),            # ceil_mode window starting in padding: dropped
    ('max', 3, 1, 1, True, True, (7, 7)),            # GoogLeNet's branch pool
    ('max', (3, 2), (2, 1), (1, 0), False, True, (9, 10)),
    ('max', 3, 2, ((0, 1), (1, 1)), False, True, (8, 8)),  # per-side (no torch equivalent)
    ('avg', 2, None, 0, False, True, (8, 8)),
    ('avg', 3, 2, 1, False, True, (9, 10)),          # padded zeros count (PyTorch's default)
    ('avg', 3, 2, 1, False, False, (9, 10)),         # ... or not
    ('avg', 3, 1, 1, False, False, (6, 7)),
    ('avg', (2, 3), (1, 2), (1, 1), False, True, (7, 9)),
]


@functools.lru_cache(maxsize=None)
def _pool(case_id):
  kind, k, s, p, ceil, cip, hw = POOL_CASES[case_id]
  x = _random((2, *hw, 3), 100 + case_id)
  if kind == 'max':
    module = layers.MaxPool2d(k, stride=s, padding=p, ceil_mode=ceil)
  else:
    module = layers.AvgPool2d(k, stride=s, padding=p, count_include_pad=cip)
  return x, np.asarray(module.apply({}, x))


@pytest.mark.parametrize('case_id', range(len(POOL_CASES)))
def test_pool_matches_reference(case_id):
  kind, k, s, p, ceil, cip, _ = POOL_CASES[case_id]
  x, y = _pool(case_id)
  if kind == 'max':
    expected = reference.max_pool2d(x, k, s, p, ceil_mode=ceil)
  else:
    expected = reference.avg_pool2d(x, k, s, p, count_include_pad=cip)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, **TOL)


@pytest.mark.parametrize('case_id', range(len(POOL_CASES)))
def test_pool_matches_torch(case_id):
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  kind, k, s, p, ceil, cip, _ = POOL_CASES[case_id]
  if not isinstance(p, int) and not isinstance(p[0], int):
    pytest.skip('PyTorch pools have no per-side padding')
  x, y = _pool(case_id)
  xt = _torch_nchw(torch, x)
  stride = k if s is None else s
  if kind == 'max':
    out = F.max_pool2d(xt, k, stride, p, ceil_mode=ceil)
  else:
    out = F.avg_pool2d(xt, k, stride, p, count_include_pad=cip)
  np.testing.assert_allclose(y, out.numpy().transpose(0, 2, 3, 1), **TOL)


def test_ceil_mode_changes_the_output_size():
  assert _pool(2)[1].shape[1:3] == (4, 4)  # floor would give (3, 4)
  assert _pool(3)[1].shape[1:3] == (3, 3)  # a 4th window would start in the padding


def test_global_and_adaptive_avg_pool():
  x = _random((2, 10, 7, 3), 7)
  np.testing.assert_allclose(layers.GlobalAvgPool().apply({}, x), x.mean(axis=(1, 2)), **TOL)
  torch = pytest.importorskip('torch')
  xt = _torch_nchw(torch, x)
  for out in [(5, 7), (3, 4), (1, 1), (10, 7), 6]:
    expected = torch.nn.functional.adaptive_avg_pool2d(xt, out).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), out), expected, **TOL)


@functools.lru_cache(maxsize=None)
def _batch_norm():
  """Flax BatchNorm in training and evaluation on one input, from non-trivial variables."""
  x = 3 * _random((4, 5, 6, 3), 11) + 1
  bn = layers.BatchNorm()
  rng = np.random.default_rng(12)
  variables = {
      'params': {'scale': rng.uniform(0.5, 2, 3).astype(np.float32),
                 'bias': rng.standard_normal(3).astype(np.float32)},
      'batch_stats': {'mean': rng.standard_normal(3).astype(np.float32),
                      'var': rng.uniform(0.5, 2, 3).astype(np.float32)}}
  y_train, updated = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  y_eval = bn.apply(variables, x, use_running_average=True)
  return x, variables, np.asarray(y_train), updated['batch_stats'], np.asarray(y_eval)


def test_batch_norm_matches_reference():
  x, v, y_train, stats, y_eval = _batch_norm()
  p, s = v['params'], v['batch_stats']
  y, mean, var = reference.batch_norm_train(x, s['mean'], s['var'], p['scale'], p['bias'],
                                            momentum=0.1)  # PyTorch 0.1 == layers' default 0.9
  np.testing.assert_allclose(y_train, y, **TOL)
  np.testing.assert_allclose(stats['mean'], mean, **TOL)
  np.testing.assert_allclose(stats['var'], var, **TOL)  # unbiased, like PyTorch
  np.testing.assert_allclose(
      y_eval, reference.batch_norm(x, s['mean'], s['var'], p['scale'], p['bias']), **TOL)


def test_batch_norm_matches_torch():
  torch = pytest.importorskip('torch')
  x, v, y_train, stats, y_eval = _batch_norm()
  p, s = v['params'], v['batch_stats']
  mean, var = torch.tensor(s['mean']), torch.tensor(s['var'])
  args = dict(weight=torch.tensor(p['scale']), bias=torch.tensor(p['bias']), eps=1e-5)
  xt = _torch_nchw(torch, x)
  out = torch.nn.functional.batch_norm(xt, mean, var, training=True, momentum=0.1, **args)
  np.testing.assert_allclose(y_train, out.numpy().transpose(0, 2, 3, 1), **TOL)
  np.testing.assert_allclose(stats['mean'], mean.numpy(), **TOL)  # updated in place
  np.testing.assert_allclose(stats['var'], var.numpy(), **TOL)
  out = torch.nn.functional.batch_norm(xt, torch.tensor(s['mean']), torch.tensor(s['var']),
                                       training=False, **args)
  np.testing.assert_allclose(y_eval, out.numpy().transpose(0, 2, 3, 1), **TOL)


def test_batch_norm_init_leaves_running_stats_alone():
  init = jax.jit(functools.partial(layers.BatchNorm().init, use_running_average=False))
  variables = init(jax.random.key(0), jnp.ones((2, 3, 3, 4)))
  np.testing.assert_array_equal(variables['batch_stats']['mean'], np.zeros(4))
  np.testing.assert_array_equal(variables['batch_stats']['var'], np.ones(4))


def test_linear_matches_numpy_and_torch_init_bounds():
  x = _random((3, 20), 5)
  variables = jax.jit(layers.Linear(7).init)(jax.random.key(1), x)
  kernel, bias = (np.asarray(variables['params'][k]) for k in ('kernel', 'bias'))
  np.testing.assert_allclose(layers.Linear(7).apply(variables, x), x @ kernel + bias, **TOL)
  bound = 1 / np.sqrt(20)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.8 * bound


def test_dropout_is_identity_in_eval_and_scales_in_training():
  x = jnp.ones((4, 100))
  drop = layers.Dropout(0.5)
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  y = np.asarray(drop.apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(0)}))
  assert set(np.unique(y)) == {0.0, 2.0} and 0.35 < (y == 0).mean() < 0.65


@pytest.mark.parametrize('module, shape, message', [
    (layers.Conv2d(4, 3), (8, 8, 3), 'rank 4'),
    (layers.MaxPool2d(2), (8, 8), 'rank 4'),
    (layers.AvgPool2d(2), (1, 2, 8, 8, 3), 'rank 4'),
    (layers.GlobalAvgPool(), (2, 3), 'rank 4'),
    (layers.Conv2d(4, 5), (1, 4, 4, 3), 'empty'),
    (layers.Conv2d(4, 3, padding=1, dilation=3), (1, 4, 4, 3), 'empty'),
    (layers.MaxPool2d(3, stride=2), (1, 2, 8, 3), 'empty'),
    (layers.AvgPool2d(2, padding=2), (1, 8, 8, 3), 'at most half'),
    (layers.Conv2d(4, 3, stride=2, padding='same'), (1, 8, 8, 3), "padding='same'"),
    (layers.Conv2d(4, 3, padding='full'), (1, 8, 8, 3), 'padding must be'),
    (layers.Conv2d(4, 3, groups=2), (1, 8, 8, 3), 'divisible by groups'),
    (layers.Conv2d(4, (3, 3, 3)), (1, 8, 8, 3), 'kernel_size must be'),
])
def test_bad_input_raises_a_clear_value_error(module, shape, message):
  with pytest.raises(ValueError, match=message):
    module.init(jax.random.key(0), jnp.zeros(shape))


def test_empty_output_message_names_the_layer_and_sizes():
  with pytest.raises(ValueError) as info:
    layers.Conv2d(8, 7, stride=2).init(jax.random.key(0), jnp.zeros((1, 5, 32, 3)))
  text = str(info.value)
  assert text.startswith('Conv2d:') and '(5, 32)' in text and '(7, 7)' in text
  assert text.count('.') == 1 and '\n' not in text  # one sentence


def test_layers_are_pure_under_jit():
  """Same variables and input -> same output, twice, jitted; no hidden state leaks out."""
  cin, feat, k, s, p, d, g, bias, hw = CONV_CASES[2]
  x, kernel, b, y = _conv(2)
  apply = jax.jit(layers.Conv2d(feat, k, s, p, d, g, bias).apply)
  variables = {'params': {'kernel': kernel, 'bias': b}}
  np.testing.assert_array_equal(apply(variables, x), apply(variables, x))
  np.testing.assert_allclose(apply(variables, x), y, **TOL)


# Convolutions that Conv2d computes on pixel blocks on the CPU (few channels, stride 1), and
# tiling pools (stride == kernel) that it reduces over a reshaped view: their gradients, not just
# their outputs, must equal PyTorch's. (in_channels, features, kernel, padding, (H, W))
BLOCK_CONV_CASES = [
    (1, 6, 5, 2, (28, 28)),     # LeNet-5's first conv (4x4 blocks)
    (6, 16, 5, 0, (14, 14)),    # LeNet-5's second conv (2x2 blocks)
    (3, 6, 5, 0, (32, 32)),     # the tutorial net's first conv
    (3, 5, 3, 1, (9, 11)),      # odd sizes: the block grid overhangs the input
    (2, 4, (3, 5), (1, 2), (7, 10)),
]


def _torch_grads(torch, fn, *arrays):
  tensors = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_() for a in arrays]
  out = fn(*tensors)
  grad_out = torch.from_numpy(_random(tuple(out.shape), 7))
  (out * grad_out).sum().backward()
  return out.detach().numpy(), grad_out.numpy(), [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize('case_id', range(len(BLOCK_CONV_CASES)))
def test_block_conv_gradients_match_torch(case_id):
  torch = pytest.importorskip('torch')
  cin, feat, k, p, hw = BLOCK_CONV_CASES[case_id]
  k = layers.pair(k)
  if jax.default_backend() == 'cpu':  # the case must exercise the block path it is here for
    assert fast_paths.space_to_depth_block(cin, feat, k, (1, 1), (1, 1), 1) > 1
  x = _random((2, cin, *hw), 200 + case_id)                  # NCHW, as PyTorch wants it
  w = _random((feat, cin, *k), 300 + case_id) / np.float32(np.sqrt(cin * k[0] * k[1]))
  out, grad_out, (dx, dw) = _torch_grads(
      torch, lambda x, w: torch.nn.functional.conv2d(x, w, padding=p), x, w)

  module = layers.Conv2d(feat, kernel_size=k, padding=p, use_bias=False)
  def loss(x_nhwc, kernel_hwio):
    y = module.apply({'params': {'kernel': kernel_hwio}}, x_nhwc)
    return jnp.vdot(y, grad_out.transpose(0, 2, 3, 1)), y
  (_, y), (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0))
  np.testing.assert_allclose(y, out.transpose(0, 2, 3, 1), **TOL)
  np.testing.assert_allclose(gx, dx.transpose(0, 2, 3, 1), **TOL)
  np.testing.assert_allclose(gw, dw.transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kind', ['max', 'avg'])
@pytest.mark.parametrize('kernel, hw', [(2, (8, 8)), (2, (9, 7)), (3, (10, 12)), ((2, 3), (6, 7))])
def test_tiling_pool_gradients_match_torch(kind, kernel, hw):
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  x = _random((2, 3, *hw), 400)   # continuous values: no ties, so max's gradient is unambiguous
  pool = F.max_pool2d if kind == 'max' else F.avg_pool2d
  out, grad_out, (dx,) = _torch_grads(torch, lambda x: pool(x, kernel), x)
  module = layers.MaxPool2d(kernel) if kind == 'max' else layers.AvgPool2d(kernel)
  y, vjp = jax.vjp(lambda x: module.apply({}, x), x.transpose(0, 2, 3, 1))
  (gx,) = vjp(jnp.asarray(grad_out.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(y, out.transpose(0, 2, 3, 1), **TOL)
  np.testing.assert_allclose(gx, dx.transpose(0, 2, 3, 1), **TOL)


@pytest.mark.parametrize('kernel, hw', [(2, (8, 8)), (3, (9, 7)), ((2, 3), (6, 7))])
def test_tiling_max_pool_gradient_goes_to_the_first_of_equal_maxima_as_torch(kernel, hw):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(3).integers(0, 3, (2, 3, *hw)).astype(np.float32)  # many ties
  out, grad_out, (dx,) = _torch_grads(torch, lambda x: torch.nn.functional.max_pool2d(x, kernel), x)
  y, vjp = jax.vjp(lambda x: layers.MaxPool2d(kernel).apply({}, x), x.transpose(0, 2, 3, 1))
  (gx,) = vjp(jnp.asarray(grad_out.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(y, out.transpose(0, 2, 3, 1), **TOL)
  np.testing.assert_allclose(gx, dx.transpose(0, 2, 3, 1), **TOL)
