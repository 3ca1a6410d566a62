"""A readable NumPy reference of the CNN forward passes: the test oracle and a teaching artifact.

Everything here is plain NumPy on NHWC arrays, written to be read next to the formulas in the
docstrings rather than to be fast. The Flax layers in `cnnjax.layers` must agree with these
functions (tests/test_layers.py), and these functions agree with PyTorch's. The padding and
output-size arithmetic below is written apart from `cnnjax.shapes` on purpose: an oracle must
not share the code it checks.

Conventions (PyTorch's, in NHWC):

* ``x`` is ``(N, H, W, C)``; a convolution kernel ``w`` is HWIO, ``(KH, KW, C // groups, O)``.
* Padding is an int ``p`` (``p`` on every side), a pair ``(ph, pw)``, per-side pairs
  ``((top, bottom), (left, right))``, ``'valid'`` (none) or ``'same'`` (stride 1; the odd pixel
  of an even kernel goes to the bottom/right, as in PyTorch).
* Output size along one axis, for input ``W``, kernel ``F``, stride ``S``, dilation ``D`` and
  padding ``P_lo + P_hi``::

      out = floor((W + P_lo + P_hi - D * (F - 1) - 1) / S) + 1
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

Padding = Union[int, str, Sequence[int], Sequence[Sequence[int]]]


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def _sides(padding: Padding, kernel: Sequence[int], dilation: Sequence[int]):
  """Any padding spec -> ``((top, bottom), (left, right))``."""
  if isinstance(padding, str):
    if padding == 'valid':
      return ((0, 0), (0, 0))
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]  # 'same' at stride 1
    return tuple((t // 2, t - t // 2) for t in total)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if all(isinstance(p, int) for p in padding):
    return tuple((p, p) for p in padding)
  return tuple(tuple(p) for p in padding)


def _out_size(size: int, kernel: int, stride: int, lo: int, hi: int, dilation: int = 1,
              ceil_mode: bool = False) -> int:
  """floor (or ceil) of (size + lo + hi - dilation*(kernel-1) - 1) / stride, plus one.

  With ``ceil_mode`` PyTorch drops a last window that would start in the right padding.
  """
  span = size + lo + hi - dilation * (kernel - 1) - 1
  if ceil_mode:
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + lo:
      out -= 1
  else:
    out = span // stride + 1
  if out < 1:
    raise ValueError(f'input size {size} is too small for kernel {kernel}: empty output.')
  return out


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride=1,
           padding: Padding = 0, dilation=1, groups: int = 1) -> np.ndarray:
  """2-D convolution (cross-correlation, as in every deep learning library).

  With ``Cg = C / groups`` input and ``Og = O / groups`` output channels per group, output
  channel ``o`` belongs to group ``g = o // Og`` and sees only input channels
  ``g*Cg ... (g+1)*Cg - 1``::

      y[n, i, j, o] = b[o] + sum_{u < KH, v < KW, c < Cg}
                      x_pad[n, i*SH + u*DH, j*SW + v*DW, g*Cg + c] * w[u, v, c, o]

  where ``x_pad`` is ``x`` with zeros added on each side. ``groups == C == O`` is a depthwise
  convolution. The loop below runs over the kernel offsets ``(u, v)``: each offset contributes
  a strided slice of the padded input times one ``(Cg, Og)`` matrix of weights, which is the
  same sum as im2col (one big patch matrix times the flattened kernel) in a readable order.
  """
  n, h, wid, c = x.shape
  kh, kw, cg, o = w.shape
  (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
  (pt, pb), (pl, pr) = _sides(padding, (kh, kw), (dh, dw))
  if c != cg * groups or o % groups:
    raise ValueError(f'conv2d: input channels {c}, kernel {w.shape} and groups {groups} disagree.')
  oh = _out_size(h, kh, sh, pt, pb, dh)
  ow = _out_size(wid, kw, sw, pl, pr, dw)
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  og = o // groups
  y = np.zeros((n, oh, ow, o), np.float64)
  for g in range(groups):
    xg = xp[..., g * cg:(g + 1) * cg]
    wg = w[..., g * og:(g + 1) * og].astype(np.float64)
    for u in range(kh):
      for v in range(kw):
        rows = slice(u * dh, u * dh + sh * (oh - 1) + 1, sh)
        cols = slice(v * dw, v * dw + sw * (ow - 1) + 1, sw)
        y[..., g * og:(g + 1) * og] += xg[:, rows, cols, :] @ wg[u, v]
  if b is not None:
    y += b
  return y.astype(x.dtype)


def _pool(x, kernel, stride, padding, ceil_mode, reduce):
  """Runs ``reduce(window, (h0, h1, w0, w1))`` over every pooling window (PyTorch's layout).

  Window ``(i, j)`` covers padded rows ``i*SH - top ... i*SH - top + KH - 1`` of the input
  (likewise columns); ``(h0, h1, w0, w1)`` are those bounds before clipping to the input, so the
  reducer can tell how many cells were padding.
  """
  kh, kw = _pair(kernel)
  sh, sw = _pair(kernel if stride is None else stride)
  (pt, pb), (pl, pr) = _sides(padding, (kh, kw), (1, 1))
  n, h, w, c = x.shape
  oh = _out_size(h, kh, sh, pt, pb, ceil_mode=ceil_mode)
  ow = _out_size(w, kw, sw, pl, pr, ceil_mode=ceil_mode)
  y = np.empty((n, oh, ow, c), x.dtype)
  for i in range(oh):
    for j in range(ow):
      h0, w0 = i * sh - pt, j * sw - pl
      h1, w1 = h0 + kh, w0 + kw
      window = x[:, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w), :]
      y[:, i, j, :] = reduce(window, (h0, h1, w0, w1), (h + pb, w + pr))
  return y


def max_pool2d(x: np.ndarray, kernel_size, stride=None, padding: Padding = 0,
               ceil_mode: bool = False) -> np.ndarray:
  """Max pooling like ``torch.nn.functional.max_pool2d``::

      y[n, i, j, c] = max_{u < KH, v < KW} x_pad[n, i*SH + u, j*SW + v, c]

  Padded cells are -inf, so they never win. The stride defaults to the kernel size. With
  ``ceil_mode`` the output size is rounded up, and a window may hang over the bottom/right edge
  (the overhang counts as padding) as long as it starts inside the input or the top/left padding.
  """
  return _pool(x, kernel_size, stride, padding, ceil_mode,
               lambda window, bounds, ends: window.max(axis=(1, 2)))


def avg_pool2d(x: np.ndarray, kernel_size, stride=None, padding: Padding = 0,
               ceil_mode: bool = False, count_include_pad: bool = True) -> np.ndarray:
  """Average pooling like ``torch.nn.functional.avg_pool2d``::

      y[n, i, j, c] = sum_{cells of the window inside x} x[n, ., ., c] / divisor

  ``count_include_pad=True`` (PyTorch's default): the divisor counts the zero padding too, i.e.
  the window clipped to the *padded* input ``[-top, H + bottom)``; a ceil-mode overhang beyond
  that does not count. ``count_include_pad=False``: the divisor counts only cells inside ``x``.
  """
  def mean(window, bounds, ends):
    h0, h1, w0, w1 = bounds
    if count_include_pad:
      divisor = (min(h1, ends[0]) - h0) * (min(w1, ends[1]) - w0)
    else:
      divisor = window.shape[1] * window.shape[2]
    return window.sum(axis=(1, 2), dtype=np.float64) / divisor
  return _pool(x, kernel_size, stride, padding, ceil_mode, mean)


def batch_norm(x: np.ndarray, mean: np.ndarray, var: np.ndarray, scale: np.ndarray | None = None,
               bias: np.ndarray | None = None, eps: float = 1e-5) -> np.ndarray:
  """Batch-norm forward with given statistics (evaluation mode uses the running ones)::

      y = (x - mean) / sqrt(var + eps) * scale + bias      (per channel, the last axis)
  """
  y = (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + eps)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


def batch_norm_train(x: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray,
                     scale: np.ndarray | None = None, bias: np.ndarray | None = None,
                     momentum: float = 0.1, eps: float = 1e-5):
  """Batch-norm forward in training mode; returns ``(y, new_running_mean, new_running_var)``.

  Over the ``m = N*H*W`` values of each channel::

      mu = mean(x)                       sigma2 = mean((x - mu)^2)      (biased: divides by m)
      y  = (x - mu) / sqrt(sigma2 + eps) * scale + bias
      running_mean <- (1 - momentum) * running_mean + momentum * mu
      running_var  <- (1 - momentum) * running_var  + momentum * sigma2 * m / (m - 1)

  The running variance uses the *unbiased* estimate, as PyTorch does. ``momentum`` here is
  PyTorch's (the weight of the new batch statistic); Flax's and `cnnjax.layers.BatchNorm`'s
  momentum is ``1 - momentum`` (PyTorch 0.1 == Flax 0.9).
  """
  x64 = x.astype(np.float64).reshape(-1, x.shape[-1])
  m = x64.shape[0]
  mu = x64.mean(axis=0)
  sigma2 = ((x64 - mu) ** 2).mean(axis=0)
  y = batch_norm(x, mu, sigma2, scale, bias, eps)
  new_mean = (1 - momentum) * running_mean + momentum * mu
  new_var = (1 - momentum) * running_var + momentum * sigma2 * m / max(m - 1, 1)
  return y, new_mean, new_var


__all__ = ['conv2d', 'max_pool2d', 'avg_pool2d', 'batch_norm', 'batch_norm_train']
