"""oneDNN convolutions (cnnjax.kernels) against XLA's lax.conv_general_dilated and its VJP.

One jitted program computes every case of the grid (so one compilation): outputs, input and
kernel gradients, float32 (relative error <= 1e-5) and bfloat16 (within bfloat16 rounding).
Then Conv2d's dispatch, determinism, the switch, the fallback warning, and 8 simulated devices
(sharded jit and pmap) in a child process.
"""
import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import kernels, layers
from cnnjax.errors import ConfigError
from cnnjax.fast_paths import cpu_fast_paths
from cnnjax.kernels import build, conv, loader

# (batch, h, w, in, out, kernel, stride, ((top, bottom), (left, right)), dilation, groups)
CASES = [
    (2, 9, 8, 4, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),    # plain 3x3, same size
    (2, 9, 8, 4, 6, (3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2), 2),    # asymmetric everything
    (3, 7, 7, 8, 8, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 8),    # depthwise, stride 2
    (2, 10, 10, 3, 5, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),  # 1x1 downsample
    (2, 16, 16, 64, 128, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),  # ResNet downsample
    (1, 12, 11, 6, 4, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), 1),  # 5x5
    (2, 11, 11, 4, 8, (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2), 4),  # dilated, grouped
    (2, 8, 8, 16, 16, (3, 3), (3, 3), ((0, 2), (1, 0)), (1, 1), 1),  # stride 3, uncovered rows
    (1, 13, 13, 3, 16, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),  # a ResNet stem
    # Winograd F(4x4, 3x3): sizes that leave partial tiles, every padding 0-2, channels 16-40
    (2, 9, 10, 16, 24, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    (1, 7, 13, 32, 16, (3, 3), (1, 1), ((0, 2), (2, 0)), (1, 1), 1),
    (3, 6, 6, 40, 16, (3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
]
WINOGRAD_CASES = range(len(CASES) - 3, len(CASES))


@pytest.fixture(scope='module')
def lib():
  """The library: the one built at install, else built once here (Linux x86_64 only)."""
  if build.supported_platform():
    pytest.skip(f'no oneDNN convolutions here: {build.supported_platform()}')
  if not os.path.exists(build.default_library_path()):
    try:
      build.build()   # any other failure to build on Linux x86_64 fails the tests
    except build.BuildError as e:
      if 'no C++ compiler' not in str(e):
        raise
      pytest.skip(f'cannot build the oneDNN convolutions: {e}')
    loader.forget()
  found = loader.library(warn=False)
  assert found is not None, loader.unavailable_reason()
  return found


def _operands(case, seed):
  n, h, w, c, o, k, *_, groups = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*k, c // groups, o)) / np.sqrt(c * k[0]), jnp.float32)
  return x, kernel


def _xla(x, kernel, case):
  *_, stride, padding, dilation, groups = case
  return jax.lax.conv_general_dilated(
      x, kernel, stride, padding, rhs_dilation=dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups,
      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _onednn(x, kernel, case):
  *_, stride, padding, dilation, groups = case
  return conv.conv2d(x, kernel, stride, padding, dilation, groups)


def _value_and_grads(fn, x, kernel, case, cotangent):
  y, vjp = jax.vjp(lambda a, b: fn(a, b, case), x, kernel)
  return (y, *vjp(cotangent.astype(y.dtype)))


def _grid(operands):
  """For every case: (oneDNN f32, XLA f32, oneDNN bf16, XLA on bf16 values) x (y, dx, dw)."""
  out = []
  for case, (x, kernel, cotangent) in zip(CASES, operands):
    xb = x.astype(jnp.bfloat16)
    out.append((_value_and_grads(_onednn, x, kernel, case, cotangent),
                _value_and_grads(_xla, x, kernel, case, cotangent),
                _value_and_grads(_onednn, xb, kernel, case, cotangent),
                # the bfloat16 reference: XLA on the same bfloat16-rounded inputs, in float32
                _value_and_grads(_xla, xb.astype(jnp.float32),
                                 kernel.astype(jnp.bfloat16).astype(jnp.float32), case,
                                 cotangent.astype(jnp.bfloat16).astype(jnp.float32))))
  return out


def _grid_operands():
  operands = []
  for i, case in enumerate(CASES):
    x, kernel = _operands(case, i)
    y = jax.eval_shape(lambda a, b: _xla(a, b, case), x, kernel)
    cotangent = jnp.asarray(np.random.default_rng(100 + i).standard_normal(y.shape), jnp.float32)
    operands.append((x, kernel, cotangent))
  return operands


@pytest.fixture(scope='module')
def grid(lib):
  operands = _grid_operands()
  with kernels.use_winograd(True):   # the Winograd cases take it on any CPU
    return jax.jit(_grid)(operands)


@pytest.fixture(scope='module')
def grid_bf16_other_way(lib, grid):
  """(ours, reference) per case: the bfloat16 column again, computed the way this CPU does not
  choose by default (oneDNN's bfloat16 kernels or float32 arithmetic), where oneDNN has both."""
  if not lib.bf16_native:
    pytest.skip(f'oneDNN has no bfloat16 convolutions on this CPU ({lib.isa})')
  other = 'float32' if conv.bfloat16_arithmetic(lib)[0] == 'native' else 'native'
  operands = _grid_operands()
  with kernels.use_winograd(True), kernels.use_bfloat16_arithmetic(other):
    assert conv.bfloat16_arithmetic(lib)[0] == other
    columns = jax.jit(lambda ops: [_value_and_grads(_onednn, x.astype(jnp.bfloat16), kernel, case, t)
                                   for case, (x, kernel, t) in zip(CASES, ops)])(operands)
  return [(ours, reference) for ours, (_, _, _, reference) in zip(columns, grid)]


def _relative(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize('index', range(len(CASES)))
def test_float32_output_and_gradients_equal_xla(grid, index):
  ours, xla, _, _ = grid[index]
  for name, a, b in zip(('y', 'dx', 'dkernel'), ours, xla):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    assert _relative(a, b) <= 1e-5, (name, CASES[index], _relative(a, b))


def _assert_bfloat16_within_rounding(ours, reference, index):
  y, dx, dkernel = ours
  assert y.dtype == dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.float32
  # y and dx are rounded to bfloat16 (relative step 2**-8); the kernel gradient is float32
  # (oneDNN accumulates in float32), so only accumulation order separates it from XLA's.
  for name, a, b, tol in (('y', y, reference[0], 2 ** -7), ('dx', dx, reference[1], 2 ** -7),
                          ('dkernel', dkernel, reference[2], 1e-4)):
    assert _relative(a, b) <= tol, (name, CASES[index], _relative(a, b))


@pytest.mark.parametrize('index', range(len(CASES)))
def test_bfloat16_within_bfloat16_rounding(grid, index):
  _assert_bfloat16_within_rounding(grid[index][2], grid[index][3], index)


@pytest.mark.parametrize('index', range(len(CASES)))
def test_bfloat16_computed_the_other_way_within_bfloat16_rounding(grid_bf16_other_way, index):
  _assert_bfloat16_within_rounding(*grid_bf16_other_way[index], index)


def test_bfloat16_arithmetic_by_cpu_and_by_switch(lib, monkeypatch):
  """Native bfloat16 kernels where oneDNN has them, except on Intel without AMX (slower than
  float32 there); CNNJAX_BFLOAT16_CONV decides when set; the backend and the program say which."""
  monkeypatch.delenv(conv.BFLOAT16_SWITCH, raising=False)
  like = lambda **kw: dataclasses.replace(lib, **kw)
  assert conv.bfloat16_arithmetic(like(bf16_native=False))[0] == 'float32'
  assert conv.bfloat16_arithmetic(like(bf16_native=True, cpu_vendor='GenuineIntel',
                                       isa='avx512_core_bf16'))[0] == 'float32'
  assert conv.bfloat16_arithmetic(like(bf16_native=True, cpu_vendor='GenuineIntel',
                                       isa='avx512_core_amx'))[0] == 'native'
  assert conv.bfloat16_arithmetic(like(bf16_native=True, cpu_vendor='AuthenticAMD',
                                       isa='avx512_core_bf16'))[0] == 'native'
  case = CASES[0]
  x, kernel = _operands(case, 0)
  for asked, by_context in (('float32', False), ('native', False), ('float32', True),
                           ('native', True)):
    # the context manager wins over the environment, which asks for the other way then
    other = 'native' if asked == 'float32' else 'float32'
    monkeypatch.setenv(conv.BFLOAT16_SWITCH, other if by_context else asked)
    with kernels.use_bfloat16_arithmetic(asked if by_context else None):
      expected = asked if lib.bf16_native else 'float32'
      assert conv.bfloat16_arithmetic(lib)[0] == expected
      assert conv.bfloat16_arithmetic(like(bf16_native=True))[0] == asked
      assert kernels.backend()['bfloat16'] == (
          'native' if expected == 'native' else 'computed in float32')
      hlo = jax.jit(lambda a, b: _onednn(a, b, case)).lower(
          x.astype(jnp.bfloat16), kernel).as_text()
    call = next(line for line in hlo.splitlines() if 'cnnjax_conv_forward' in line)
    assert ('bf16' in call.split('cnnjax_conv_forward')[1]) == (expected == 'native'), call
  with pytest.raises(ConfigError, match="use_bfloat16_arithmetic\\('fp32'\\)"):
    with kernels.use_bfloat16_arithmetic('fp32'):
      pass


class _Net(flax.linen.Module):
  dtype: object = None

  @flax.linen.compact
  def __call__(self, x):
    x = layers.Conv2d(8, 3, padding=1, dtype=self.dtype, name='conv1')(x)
    x = layers.Conv2d(8, 3, stride=2, padding=1, groups=8, use_bias=False, dtype=self.dtype,
                      name='conv2')(jax.nn.relu(x))
    return jnp.mean(x.astype(jnp.float32) ** 2)


@pytest.fixture(scope='module')
def net():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 10, 10, 8)), jnp.float32)
  variables = _Net().init(jax.random.key(0), x)
  return x, variables


def _net_grads(x, variables, onednn: bool, dtype=None):
  with kernels.use_onednn(onednn):
    fn = jax.jit(jax.value_and_grad(lambda v: _Net(dtype).apply(v, x)))
    return fn(variables), fn.lower(variables).as_text()


def test_conv2d_runs_on_onednn_with_the_same_parameters_and_results(lib, net):
  x, variables = net
  assert set(flax.traverse_util.flatten_dict(variables['params'], sep='/')) == {
      'conv1/kernel', 'conv1/bias', 'conv2/kernel'}
  (loss, grads), hlo = _net_grads(x, variables, True)
  (loss_xla, grads_xla), hlo_xla = _net_grads(x, variables, False)
  assert all(f'cnnjax_conv_{kind}' in hlo for kind in loader.PASSES)
  assert 'cnnjax_conv' not in hlo_xla
  assert _relative(loss, loss_xla) <= 1e-5
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
    assert _relative(a, b) <= 1e-5
  # bfloat16 activations: float32 parameters and gradients, as on the XLA path
  (loss_bf, grads_bf), _ = _net_grads(x, variables, True, jnp.bfloat16)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_bf))
  assert abs(float(loss_bf) - float(loss)) <= 0.02 * float(loss)


def test_an_input_gradient_nobody_uses_is_not_computed(lib):
  """The gradients are separate calls, so XLA drops the input gradient of a constant input."""
  case = CASES[1]
  x, kernel = _operands(case, 0)
  hlo = jax.jit(jax.grad(lambda k: jnp.sum(_onednn(x, k, case) ** 2))).lower(kernel).compile()
  calls = lambda kind: hlo.as_text().count(f'custom_call_target="cnnjax_conv_{kind}"')
  assert [calls(kind) for kind in loader.PASSES] == [1, 0, 1]


def test_the_same_step_twice_is_bit_identical(lib, net):
  x, variables = net
  (_, a), _ = _net_grads(x, variables, True)
  (_, b), _ = _net_grads(x * 1.0, variables, True)
  assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_winograd_runs_where_it_fits_deterministically_and_by_cpu_or_switch(lib):
  case = CASES[WINOGRAD_CASES[0]]
  x, kernel = _operands(case, 0)

  def passes():  # a new function each time: traced (and the switch read) anew
    return jax.jit(lambda a, b: _value_and_grads(_onednn, a, b, case, jnp.ones_like(_xla(a, b, case))))(
        x, kernel)
  with kernels.use_winograd(True):
    winograd = passes()
    assert [lib.last_impl(kind) for kind in loader.PASSES] == ['winograd_f4x4_3x3+dnnl_sgemm'] * 3
    again = passes()
  assert all(np.array_equal(a, b) for a, b in zip(winograd, again))
  automatic = passes()   # by default on AVX2 and AVX-512 CPUs
  assert np.array_equal(automatic[0], winograd[0]) == lib.isa.startswith(('avx2', 'avx512'))
  assert (kernels.backend()['winograd'] != 'off') == lib.isa.startswith(('avx2', 'avx512'))
  with kernels.use_winograd(False):
    assert kernels.backend()['winograd'] == 'off'
    direct = passes()
  assert not any(lib.last_impl(kind).startswith('winograd') for kind in loader.PASSES)
  for a, b in zip(winograd, direct):
    assert 0 < _relative(a, b) <= 1e-5   # different arithmetic, the same convolution


def test_backend_says_which_convolutions_run(lib):
  with kernels.use_onednn(True):
    info = kernels.backend()
  assert info['conv'] == 'onednn' and info['onednn'] == lib.onednn_version
  assert info['isa'] == lib.isa and info['library'] == lib.path
  with kernels.use_onednn(False):
    assert kernels.backend()['conv'] == 'xla'
  automatic = kernels.backend()   # oneDNN by default only where it was measured faster
  assert (automatic['conv'] == 'onednn') == lib.isa.startswith(('avx2', 'avx512')), automatic
  with kernels.use_onednn(True):
    assert kernels.active()
    with cpu_fast_paths(False):   # exports and summaries: plain convolutions, as Conv2d does
      assert not kernels.active()


def test_a_missing_library_falls_back_to_xla_and_says_why_once(lib, net, monkeypatch, tmp_path):
  x, variables = net
  missing = str(tmp_path / build.library_name())
  with open(build.error_file(missing), 'w') as f:
    f.write('g++ failed on onednn_conv.cc: an example\n')
  monkeypatch.setattr(build, 'default_library_path', lambda: missing)
  loader.forget()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      assert not kernels.active() and not kernels.active()
      (loss, _), hlo = _net_grads(x, variables, True)
    assert 'cnnjax_conv' not in hlo and np.isfinite(loss)
    messages = [str(w.message) for w in caught if w.category is kernels.KernelUnavailableWarning]
    assert messages == ["cnnjax uses XLA's CPU convolutions, not oneDNN's: the library was not "
                        "built at install: g++ failed on onednn_conv.cc: an example."]
    assert kernels.backend() == {'conv': 'xla', 'reason': messages[0].split(': ', 1)[1][:-1]}
  finally:
    monkeypatch.undo()
    loader.forget()
  with kernels.use_onednn(True):
    assert kernels.active()


def test_an_out_of_date_library_falls_back_to_xla_and_says_to_rebuild(lib, monkeypatch):
  """A library built from an older onednn_conv.cc lacks a handler: one reason, not a traceback
  (libdnnl itself stands in for it: it loads and has none of cnnjax's symbols)."""
  monkeypatch.setattr(build, 'default_library_path', build.onednn_library)
  loader.forget()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      assert not kernels.active()
    messages = [str(w.message) for w in caught if w.category is kernels.KernelUnavailableWarning]
    assert len(messages) == 1 and 'is out of date' in messages[0], messages
    assert messages[0].endswith('rebuild it with `python -m cnnjax.kernels.build`.'), messages
  finally:
    monkeypatch.undo()
    loader.forget()


_CHILD = textwrap.dedent('''
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, os.path.dirname(sys.argv[1]))
    import test_kernels as t
    from cnnjax import kernels
    case = t.CASES[1]
    x, kernel = t._operands(case, 0)
    x = jnp.concatenate([x] * 8)              # 16 images: 2 per device
    def loss(fn):
      return jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k, case))), argnums=(0, 1))
    mesh = Mesh(np.array(jax.devices()), ('data',))
    xs = jax.device_put(x, NamedSharding(mesh, P('data')))
    ks = jax.device_put(kernel, NamedSharding(mesh, P()))
    sharded = jax.jit(loss(t._onednn))
    hlo = sharded.lower(xs, ks).compile().as_text()
    calls = [l for l in hlo.splitlines() if 'custom_call_target="cnnjax_conv' in l]
    (v, (dx, dk)) = sharded(xs, ks)
    (rv, (rdx, rdk)) = jax.jit(loss(t._xla))(x, kernel)
    per_device = jax.pmap(jax.grad(lambda x, k: jnp.sum(jnp.sin(t._onednn(x, k, case))), 1),
                          'data')(x.reshape(8, 2, *x.shape[1:]), jnp.stack([kernel] * 8))
    print(json.dumps(dict(
        backend=kernels.backend()['conv'], devices=jax.device_count(),
        shard_shapes=all('[2,' in l for l in calls), calls=len(calls),
        value=t._relative(v, rv), dx=t._relative(dx, rdx), dk=t._relative(dk, rdk),
        dx_sharded=dx.sharding.spec == P('data'), pmap_dk=t._relative(per_device.sum(0), rdk))))
''')


def test_eight_devices_each_run_the_kernel_on_their_shard(lib):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', CNNJAX_ONEDNN='1')
  proc = subprocess.run([sys.executable, '-c', _CHILD, __file__], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r['backend'] == 'onednn' and r['devices'] == 8
  assert r['calls'] == 3 and r['shard_shapes'], 'each device convolves its own 2 images'
  assert r['dx_sharded'], 'the input gradient stays sharded like the input'

  for key in ('value', 'dx', 'dk', 'pmap_dk'):
    assert r[key] <= 1e-5, (key, r)


def test_switched_off_by_the_environment(lib):
  code = ('from cnnjax import kernels; import warnings; warnings.simplefilter("error"); '
          'print(kernels.active(), kernels.backend())')
  env = dict(os.environ, CNNJAX_ONEDNN='0')
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == ("False {'conv': 'xla', 'reason': 'switched off "
                                 "(CNNJAX_ONEDNN=0)'}")


@pytest.mark.parametrize('name, read', [
    (loader.ENV_SWITCH, lambda lib: loader.env_switch()),
    (conv.BFLOAT16_SWITCH, lambda lib: conv.bfloat16_arithmetic(
        dataclasses.replace(lib, bf16_native=True)))])
def test_a_switch_set_to_no_setting_is_a_config_error(lib, monkeypatch, name, read):
  """A typo in CNNJAX_ONEDNN or CNNJAX_BFLOAT16_CONV must not silently run the other way."""
  monkeypatch.setenv(name, 'auto')
  read(lib)                                          # 'auto' is the default, spelled out
  monkeypatch.setenv(name, 'onn')
  with pytest.raises(ConfigError, match=f"{name}='onn' is not a setting"):
    read(lib)


def test_vmap_of_the_gradient_runs_once_per_element(lib):
  """jacrev / per-example gradients vmap the custom VJP: each element is its own call."""
  case = CASES[1]
  x, kernel = _operands(case, 0)

  def per_example(fn):
    loss = lambda k, xi: jnp.sum(jnp.sin(fn(xi[None], k, case)))
    return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(kernel, x)
  assert _relative(per_example(_onednn), per_example(_xla)) <= 1e-5
