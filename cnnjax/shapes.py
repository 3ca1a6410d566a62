"""CNN shape arithmetic as plain Python: output sizes, receptive fields, parameters and MACs.

These are the formulas of a CNN course, executable (no JAX needed). `cnnjax.summary` applies
the same rules to every layer of a real model.

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


def pair(value: Size, name: str = 'value') -> tuple[int, int]:
  """``(v, v)`` for an int, the pair itself for a pair of ints (like torch's `_pair`)."""
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) for v in value):
    raise ShapeError(f'{name} must be an int or a pair of ints, got {value!r}.')
  return value


def _sides_1d(padding) -> tuple[int, int]:
  if isinstance(padding, int):
    return (padding, padding)
  lo, hi = padding
  return (int(lo), int(hi))


def conv_output_size(size: Size, kernel: Size, stride: Size = 1, padding=0, dilation: Size = 1,
                     ceil_mode: bool = False):
  """Output size of a convolution or pooling layer.

  Args:
    size: input size along one axis (an int), or ``(H, W)``.
    kernel, stride, dilation: ints, or pairs when ``size`` is a pair.
    padding: for an int ``size``: ``P`` (both sides) or ``(P_lo, P_hi)``. For a pair ``size``:
      ``P``, ``(P_h, P_w)``, per-side ``((top, bottom), (left, right))``, ``'valid'``, or
      ``'same'`` (stride 1 only).
    ceil_mode: round up, as pooling layers with ``ceil_mode=True`` do.

  Returns:
    An int, or an ``(H_out, W_out)`` tuple when ``size`` is a pair.

  Raises:
    ValueError: if the kernel does not fit in the padded input (the output would be empty).
  """
  if not isinstance(size, int):
    h, w = pair(size, 'size')
    kh, kw = pair(kernel, 'kernel')
    sh, sw = pair(stride, 'stride')
    dh, dw = pair(dilation, 'dilation')
    if isinstance(padding, str):
      if padding.lower() == 'valid':
        padding = ((0, 0), (0, 0))
      elif padding.lower() == 'same' and (sh, sw) == (1, 1):
        padding = tuple((t // 2, t - t // 2) for t in (dh * (kh - 1), dw * (kw - 1)))
      else:
        raise ShapeError(f"padding {padding!r} is not 'valid' or 'same' with stride 1.")
    elif isinstance(padding, int):
      padding = (padding, padding)
    ph, pw = padding
    return (conv_output_size(h, kh, sh, ph, dh, ceil_mode),
            conv_output_size(w, kw, sw, pw, dw, ceil_mode))
  lo, hi = _sides_1d(padding)
  if min(size, kernel, stride, dilation) < 1 or min(lo, hi) < 0:
    raise ShapeError(f'size {size}, kernel {kernel}, stride {stride} and dilation {dilation} must '
                     f'be positive and padding {padding} non-negative.')
  span = size + lo + hi - dilation * (kernel - 1) - 1
  if span < 0:
    raise ShapeError(f'input size {size} with padding {(lo, hi)} is smaller than the '
                     f'{"dilated " if dilation > 1 else ""}kernel {dilation * (kernel - 1) + 1}; '
                     'the output would be empty.')
  if ceil_mode:
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + lo:  # the last window would start in the right padding
      out -= 1
    return out
  return span // stride + 1


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


__all__ = ['conv_output_size', 'ReceptiveField', 'receptive_field', 'receptive_fields',
           'conv_params', 'conv_macs', 'linear_params', 'linear_macs', 'batchnorm_params']
