"""CNN shape arithmetic as plain Python: output sizes, receptive fields, parameters and MACs.

These are the formulas of a CNN course, executable (no JAX needed), and their one home:
`cnnjax.layers` takes its padding and output-size checks from here, and `cnnjax.summary`
applies the same rules to every layer of a real model.

* Output size along one axis (input ``W``, kernel ``F``, stride ``S``, padding ``P`` per side,
  dilation ``D``)::

      out = floor((W + P_lo + P_hi - D*(F - 1) - 1) / S) + 1      # (W - F + 2P)/S + 1 when D = 1

  Pooling with ``ceil_mode`` rounds up instead, but (like PyTorch) drops a last window that would
  start in the right padding.
* Receptive field ``r`` and jump ``j`` (the distance, in input pixels, between neighbouring
  outputs), starting from ``r = j = 1`` at the input::

      r_out = r_in + (F - 1) * D * j_in          j_out = j_in * S

* Parameters of a convolution: ``F_h * F_w * (C_in / groups) * C_out (+ C_out bias)``; its
  multiply-accumulates: that kernel volume (without bias) times ``H_out * W_out * C_out``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

from cnnjax.errors import ShapeError

Size = Union[int, Sequence[int]]
Padding = Union[int, str, Sequence[int], Sequence[Sequence[int]]]


def pair(value: Size, name: str = 'value') -> tuple[int, int]:
  """``(v, v)`` for an int, the pair itself for a pair of ints (like torch's `_pair`)."""
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) for v in value):
    raise ShapeError(f'{name} must be an int or a pair of ints, got {value!r}.')
  return value


def explicit_padding(padding: Padding, kernel_size: Sequence[int],
                     stride: Sequence[int] = (1, 1),
                     dilation: Sequence[int] = (1, 1)) -> tuple[tuple[int, int], tuple[int, int]]:
  """Turns any padding spec into ``((top, bottom), (left, right))``.

  Accepts an int (symmetric, like PyTorch), a pair ``(ph, pw)``, per-side pairs
  ``((top, bottom), (left, right))``, 'valid' (no padding) or 'same' (stride 1 only, padding
  split as PyTorch does: the extra pixel of an even kernel goes to the bottom/right).
  """
  if isinstance(padding, str):
    mode = padding.lower()
    if mode == 'valid':
      return ((0, 0), (0, 0))
    if mode == 'same':
      if tuple(stride) != (1, 1):
        raise ShapeError(f"padding='same' needs stride 1 (as in PyTorch), got stride {tuple(stride)}.")
      return tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                   for k, d in zip(kernel_size, dilation))
    raise ShapeError(f"padding must be an int, a pair, per-side pairs, 'same' or 'valid', got {padding!r}.")
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  padding = tuple(padding)
  if len(padding) == 2 and all(isinstance(p, int) for p in padding):
    return ((padding[0], padding[0]), (padding[1], padding[1]))
  if len(padding) == 2 and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding):
    return tuple((int(p[0]), int(p[1])) for p in padding)
  raise ShapeError(f"padding must be an int, a pair, per-side pairs, 'same' or 'valid', got {padding!r}.")


def _axis_output_size(size: int, kernel: int, stride: int, sides: tuple[int, int], dilation: int,
                      ceil_mode: bool, prefix: str) -> int | None:
  """The output size along one axis; None when the kernel does not fit (an empty output)."""
  lo, hi = sides
  if min(size, kernel, stride, dilation) < 1 or min(lo, hi) < 0:
    raise ShapeError(f'{prefix}size {size}, kernel {kernel}, stride {stride} and dilation '
                     f'{dilation} must be positive and padding {sides} non-negative.')
  span = size + lo + hi - dilation * (kernel - 1) - 1
  if span < 0:
    return None
  if ceil_mode:
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + lo:  # the last window would start in the right padding
      out -= 1
    return out
  return span // stride + 1


def conv_output_size(size: Size, kernel: Size, stride: Size = 1, padding=0, dilation: Size = 1,
                     ceil_mode: bool = False, *, layer: str = ''):
  """Output size of a convolution or pooling layer.

  Args:
    size: input size along one axis (an int), or ``(H, W)``.
    kernel, stride, dilation: ints, or pairs when ``size`` is a pair.
    padding: for an int ``size``: ``P`` (both sides) or ``(P_lo, P_hi)``. For a pair ``size``:
      anything `explicit_padding` accepts: ``P``, ``(P_h, P_w)``, per-side
      ``((top, bottom), (left, right))``, ``'valid'``, or ``'same'`` (stride 1 only).
    ceil_mode: round up, as pooling layers with ``ceil_mode=True`` do.
    layer: a layer name to start error messages with (``cnnjax.layers`` passes its own).

  Returns:
    An int, or an ``(H_out, W_out)`` tuple when ``size`` is a pair.

  Raises:
    ShapeError (a ValueError): if the kernel does not fit in the padded input (the output would
    be empty), or a size is not positive.
  """
  prefix = f'{layer}: ' if layer else ''
  if isinstance(size, int):
    if isinstance(padding, int):
      padding = (padding, padding)
    if isinstance(padding, str) or len(padding) != 2:
      raise ShapeError(f'{prefix}padding along one axis must be P or (P_lo, P_hi), got {padding!r}.')
    sides = (int(padding[0]), int(padding[1]))
    out = _axis_output_size(size, kernel, stride, sides, dilation, ceil_mode, prefix)
    if out is None:
      span = dilation * (kernel - 1) + 1
      raise ShapeError(f'{prefix}input size {size} with padding {sides} is smaller than the '
                       f'{"dilated " if dilation > 1 else ""}kernel {span}; '
                       'the output would be empty.')
    return out
  size, kernel = pair(size, 'size'), pair(kernel, 'kernel')
  stride, dilation = pair(stride, 'stride'), pair(dilation, 'dilation')
  sides = explicit_padding(padding, kernel, stride, dilation)
  out = tuple(_axis_output_size(*axis, ceil_mode, prefix)
              for axis in zip(size, kernel, stride, sides, dilation))
  if None in out:
    dilated = 'dilated ' if max(dilation) > 1 else ''
    raise ShapeError(f'{prefix}input {size} padded by {sides} is smaller than the {dilated}kernel '
                     f'{kernel}; the output would be empty.')
  return out


def pool_padding(size: Size, kernel: Size, stride: Size, padding: Padding = 0,
                 ceil_mode: bool = False, *, layer: str = 'pooling'
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
  """The per-side padding with which a floor-mode window reduction gives PyTorch's pooling output.

  Checks PyTorch's rules (padding at most half the kernel, a non-empty output); with
  ``ceil_mode`` adds the bottom/right padding that the last, partial window needs (padded cells
  never win a max, and `cnnjax.layers.AvgPool2d` takes ceil_mode=False only).
  """
  size, kernel, stride = pair(size, 'size'), pair(kernel, 'kernel'), pair(stride, 'stride')
  sides = explicit_padding(padding, kernel, stride)
  if any(lo > k // 2 or hi > k // 2 for k, (lo, hi) in zip(kernel, sides)):
    raise ShapeError(f'{layer}: padding {sides} must be at most half the kernel {kernel}.')
  out = conv_output_size(size, kernel, stride, sides, ceil_mode=ceil_mode, layer=layer)
  return tuple((lo, max(hi, (o - 1) * s + k - n - lo))
               for n, k, s, (lo, hi), o in zip(size, kernel, stride, sides, out))


class ReceptiveField(NamedTuple):
  """Receptive field ``size`` (input pixels one output sees) and ``jump`` (effective stride)."""
  size: int
  jump: int


def receptive_fields(layers: Sequence[Sequence[int]]) -> list[ReceptiveField]:
  """Receptive field after each layer of a chain, starting from one input pixel.

  Args:
    layers: ``(kernel,)``, ``(kernel, stride)`` or ``(kernel, stride, dilation)`` per layer, in
      order. Padding does not change the size or the jump (only where the field is centred).
      Element-wise layers (activations, batch norm) are ``(1,)`` or can be left out.

  Returns:
    One `ReceptiveField` per layer: ``r_out = r_in + (k - 1) * d * j_in``, ``j_out = j_in * s``.
  """
  size, jump, out = 1, 1, []
  for layer in layers:
    layer = (layer,) if isinstance(layer, int) else tuple(layer)
    if not 1 <= len(layer) <= 3 or min(layer) < 1:
      raise ShapeError(f'each layer is (kernel[, stride[, dilation]]) of positive ints, '
                       f'got {layer!r}.')
    kernel, stride, dilation = layer + (1, 1)[len(layer) - 1:]
    size += (kernel - 1) * dilation * jump
    jump *= stride
    out.append(ReceptiveField(size, jump))
  return out


def receptive_field(layers: Sequence[Sequence[int]]) -> ReceptiveField:
  """Receptive field size and jump at the end of a chain of ``(kernel, stride, dilation)``
  layers (see `receptive_fields`); the input itself (no layers) is ``(1, 1)``."""
  fields = receptive_fields(layers)
  return fields[-1] if fields else ReceptiveField(1, 1)


def conv_params(in_channels: int, out_channels: int, kernel: Size, groups: int = 1,
                bias: bool = True) -> int:
  """Weights ``kh * kw * (in_channels / groups) * out_channels``, plus ``out_channels`` biases."""
  kh, kw = pair(kernel, 'kernel')
  if in_channels % groups or out_channels % groups:
    raise ShapeError(f'in_channels {in_channels} and out_channels {out_channels} must both be '
                     f'divisible by groups {groups}.')
  return kh * kw * (in_channels // groups) * out_channels + (out_channels if bias else 0)


def conv_macs(in_channels: int, out_channels: int, kernel: Size, output_size: Size,
              groups: int = 1) -> int:
  """Multiply-accumulates of one convolution on one example: every output value
  (``H_out * W_out * out_channels``) is a dot product of length ``kh * kw * in_channels/groups``.
  Bias additions are not counted (the fvcore / torchvision convention)."""
  kh, kw = pair(kernel, 'kernel')
  oh, ow = pair(output_size, 'output_size')
  if in_channels % groups:
    raise ShapeError(f'in_channels {in_channels} must be divisible by groups {groups}.')
  return oh * ow * out_channels * kh * kw * (in_channels // groups)


def linear_params(in_features: int, out_features: int, bias: bool = True) -> int:
  """``in_features * out_features`` weights plus ``out_features`` biases."""
  return in_features * out_features + (out_features if bias else 0)


def linear_macs(in_features: int, out_features: int) -> int:
  """Multiply-accumulates of one fully connected layer on one example."""
  return in_features * out_features


def batchnorm_params(channels: int) -> int:
  """Trainable scale and bias per channel (the running mean and variance are not parameters)."""
  return 2 * channels


__all__ = ['pair', 'explicit_padding', 'conv_output_size', 'pool_padding', 'ReceptiveField', 'receptive_field', 'receptive_fields',
           'conv_params', 'conv_macs', 'linear_params', 'linear_macs', 'batchnorm_params']
