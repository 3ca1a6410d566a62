"""`conv2d`: oneDNN's convolution as a JAX function, differentiable through a custom VJP.

The three passes are XLA FFI calls into the library of `cnnjax.kernels.loader` (forward: y from
x and w; backward-data: dx from w and dy; backward-weights: dw from x and dy), so they run inside
``jax.jit`` like any XLA op. The computation happens in the activations' dtype (float32 or
bfloat16, float32 accumulation); the kernel may stay float32 when the activations are bfloat16:
oneDNN converts it while reordering it, and returns its gradient in float32 directly. Where
oneDNN has no bfloat16 convolutions (AVX2 without AVX-VNNI-2), or they are slower than its float32
ones (`bfloat16_arithmetic`), bfloat16 convolutions are computed in float32 and rounded to
bfloat16.

On AVX2 and AVX-512 CPUs, float32 3x3 stride-1 convolutions (no dilation or groups, paddings
0-2, channels in eights, at least 16) run as Winograd F(4x4, 3x3) (``winograd.h``): 2.25
multiplications per output where oneDNN's direct kernels need 9; they agree with direct
convolution to float32 rounding. ``with use_winograd(False | True):`` decides for the
convolutions traced inside (True also on other instruction sets).

All passes are wrapped in `jax.experimental.custom_partitioning`, so under ``jax.jit`` with a
batch sharded over devices every device runs the kernel on its own rows (the kernel gradient is
summed over the batch axes); under ``jax.pmap`` each device calls it on its shard anyway.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.custom_batching
import jax.numpy as jnp

from cnnjax.errors import ConfigError
from cnnjax.kernels import loader
from cnnjax.kernels.partition import batch_partitioned
from cnnjax.switches import TraceSwitch, env_choice


_WINOGRAD = TraceSwitch('use_winograd')   # None: automatic


def use_winograd(enabled: bool | None):
  """Lets the convolutions traced inside run as Winograd F(4x4, 3x3) where they fit (True), keeps
  them all on oneDNN's direct convolution (False), or chooses by the CPU (None, the default)."""
  return _WINOGRAD(enabled if enabled is None else bool(enabled))


def winograd_wanted(lib) -> bool:
  """Whether convolutions traced now may run as Winograd: as asked by `use_winograd`, else on
  AVX2 and AVX-512 CPUs, where ResNet train steps were measured faster with it than with
  oneDNN's direct kernels (benchmarks/README.md)."""
  asked = _WINOGRAD.get()
  return asked if asked is not None else lib.isa.startswith(('avx2', 'avx512'))


BFLOAT16_SWITCH = 'CNNJAX_BFLOAT16_CONV'   # one of BFLOAT16_MODES; unset or 'auto': by the CPU
BFLOAT16_MODES = ('native', 'float32')
_BFLOAT16_ARITHMETIC = TraceSwitch('bfloat16_arithmetic')   # None: as the env or the CPU says


def use_bfloat16_arithmetic(mode: str | None):
  """Computes the bfloat16 convolutions traced inside on oneDNN's bfloat16 kernels ('native'),
  on their values in float32 ('float32'), or as `CNNJAX_BFLOAT16_CONV` or the CPU decides (None).
  'native' where oneDNN has no bfloat16 kernels still computes them in float32."""
  if mode is not None and mode not in BFLOAT16_MODES:
    raise ConfigError(f'use_bfloat16_arithmetic({mode!r}): use \'native\', \'float32\' or None.')
  return _BFLOAT16_ARITHMETIC(mode)


def env_bfloat16_arithmetic() -> str | None:
  """What ``CNNJAX_BFLOAT16_CONV`` asks for: one of BFLOAT16_MODES, or None (unset or 'auto');
  any other value is a `ConfigError`, on every CPU."""
  return env_choice(BFLOAT16_SWITCH, {'': None, 'auto': None, **{m: m for m in BFLOAT16_MODES}},
                    "native (oneDNN's bfloat16 kernels), float32 (bfloat16 values, float32 "
                    "arithmetic) or auto (unset: chosen by the CPU)")


def bfloat16_arithmetic(lib) -> tuple[str, str]:
  """How bfloat16 convolutions are computed here: ('native', why) on oneDNN's bfloat16 kernels
  (float32 accumulation), or ('float32', why) on the bfloat16 values converted to float32, the
  result rounded to bfloat16 (so float32 3x3 Winograd applies too).

  `use_bfloat16_arithmetic`, else ``CNNJAX_BFLOAT16_CONV=native | float32`` decides (both read
  at trace time); by default they are
  native where oneDNN has them, except on Intel CPUs without AMX: there oneDNN's AVX512-BF16
  convolutions ran slower than its float32 ones (0.6-0.7x on an AVX512-FP16 Xeon, PyTorch's
  oneDNN 3.12 alike: benchmarks/README.md), while AMX and AMD's AVX512-BF16 cores run them
  faster."""
  asked = env_bfloat16_arithmetic()   # a typo counts on every CPU
  if not lib.bf16_native:
    return 'float32', 'oneDNN has no bfloat16 convolutions on this CPU'
  in_context = _BFLOAT16_ARITHMETIC.get()
  if in_context is not None:
    return in_context, f'use_bfloat16_arithmetic({in_context!r})'
  if asked is not None:
    return asked, f'{BFLOAT16_SWITCH}={asked}'
  if lib.cpu_vendor == 'GenuineIntel' and 'amx' not in lib.isa:
    return 'float32', (f'faster than oneDNN\'s bfloat16 kernels on Intel CPUs without AMX; '
                       f'{BFLOAT16_SWITCH}=native uses those')
  return 'native', f'oneDNN\'s bfloat16 kernels ({lib.isa})'


@dataclass(frozen=True)
class ConvSpec:
  """The static part of a convolution: strides, explicit (lo, hi) paddings, dilations, groups,
  and whether the library may compute it as Winograd F(4x4, 3x3) (it decides where that fits)."""
  stride: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  dilation: tuple[int, int]
  groups: int
  winograd: bool = True

  def attrs(self) -> dict:
    (pt, pb), (pl, pr) = self.padding
    return dict(stride_h=self.stride[0], stride_w=self.stride[1], pad_top=pt, pad_bottom=pb,
                pad_left=pl, pad_right=pr, dilation_h=self.dilation[0],
                dilation_w=self.dilation[1], groups=self.groups, winograd=int(self.winograd))

  def output_hw(self, in_hw, kernel_hw) -> tuple[int, int]:
    return tuple((size + lo + hi - d * (k - 1) - 1) // s + 1 for size, (lo, hi), d, k, s in
                 zip(in_hw, self.padding, self.dilation, kernel_hw, self.stride))


@functools.lru_cache(maxsize=None)
def _pass(kind: str, spec: ConvSpec):
  """'forward' (x, w) -> y, 'backward_data' (x, w, dy) -> dx or 'backward_weights'
  (x, w, dy) -> dw, as a function of per-device shards under a sharded jit. Each is its own FFI
  call, so XLA drops an input gradient nobody uses (the first convolution's); the library runs
  one convolution at a time, so two calls XLA runs at once do not oversubscribe the cores."""
  def forward(x, w):
    oh, ow = spec.output_hw(x.shape[1:3], w.shape[:2])
    result = jax.ShapeDtypeStruct((x.shape[0], oh, ow, w.shape[3]), x.dtype)
    return jax.ffi.ffi_call(loader.TARGETS['forward'], result, vmap_method='sequential')(
        x, w, **spec.attrs())

  def backward_data(x, w, dy):   # x for its shape (and the partitioning rule) only
    return jax.ffi.ffi_call(loader.TARGETS['backward_data'],
                            jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method='sequential')(
        w, dy, **spec.attrs())

  def backward_weights(x, w, dy):   # w for its shape and dtype only
    return jax.ffi.ffi_call(loader.TARGETS['backward_weights'],
                            jax.ShapeDtypeStruct(w.shape, w.dtype), vmap_method='sequential')(
        x, dy, **spec.attrs())
  fn = {'forward': forward, 'backward_data': backward_data,
        'backward_weights': backward_weights}[kind]
  # custom_partitioning has no batching rule: under vmap (jacrev, per-example gradients) the
  # pass runs once per vmapped element.
  return jax.custom_batching.sequential_vmap(batch_partitioned(kind, fn))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(spec: ConvSpec, x, w):
  return _pass('forward', spec)(x, w)


def _conv_fwd(spec, x, w):
  return _conv(spec, x, w), (x, w)


def _conv_bwd(spec, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  return (_pass('backward_data', spec)(x, w, dy), _pass('backward_weights', spec)(x, w, dy))


_conv.defvjp(_conv_fwd, _conv_bwd)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def conv2d(x: jax.Array, kernel: jax.Array, stride, padding, dilation=(1, 1),
           groups: int = 1) -> jax.Array:
  """NHWC x HWIO convolution by oneDNN: ``lax.conv_general_dilated(x, kernel, stride, padding,
  rhs_dilation=dilation, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  feature_group_count=groups)`` in x's dtype; `padding` is explicit ((top, bottom), (left, right)).

  The kernel may be float32 with bfloat16 `x` (its gradient is then float32). Call only when
  `supports` says yes.
  """
  stride, padding = tuple(stride), tuple(tuple(p) for p in padding)
  if kernel.shape[:2] == (1, 1) and stride != (1, 1) and padding == ((0, 0), (0, 0)):
    # A strided 1x1 convolution is a 1x1 convolution of every s-th pixel (what oneDNN does
    # inside too; its jit_1x1 backward-weights with stride and 3 channels corrupts memory).
    x, stride = x[:, ::stride[0], ::stride[1]], (1, 1)
  lib = loader.library()
  if lib is None:
    raise RuntimeError(f'the oneDNN convolutions are unavailable: {loader.unavailable_reason()}')
  spec = ConvSpec(stride, padding, tuple(dilation), groups, winograd_wanted(lib))
  if x.dtype == jnp.bfloat16 and bfloat16_arithmetic(lib)[0] == 'float32':
    # bfloat16 values, float32 arithmetic, bfloat16 out (see `bfloat16_arithmetic`).
    # The kernel is rounded to bfloat16 as oneDNN would, its gradient stays float32 as well.
    kernel = kernel.astype(jnp.float32)
    kernel = kernel + jax.lax.stop_gradient(kernel.astype(x.dtype).astype(jnp.float32) - kernel)
    return _conv(spec, x.astype(jnp.float32), kernel).astype(x.dtype)
  if kernel.dtype != x.dtype and x.dtype != jnp.bfloat16:
    kernel = kernel.astype(x.dtype)
  return _conv(spec, x, kernel)


def supports(x: jax.Array, kernel: jax.Array, padding) -> bool:
  """Whether `conv2d` computes this convolution (float32/bfloat16, padding >= 0, no empty axes)."""
  return (x.dtype in SUPPORTED_DTYPES and kernel.dtype in SUPPORTED_DTYPES
          and all(p >= 0 for pair in padding for p in pair)
          and all(d > 0 for d in (*x.shape, *kernel.shape)))
