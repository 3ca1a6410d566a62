"""airbench94: the network of Keller Jordan's CIFAR-10 speedrun (cifar10-airbench, airbench94.py).

Layout at 32x32 (names in brackets; airbench's ``nn.Sequential`` index after the arrow):

* ``whiten`` -> 0: a 2x2 conv, no padding, 3 -> 24 channels (32 -> 31 px), with bias; GELU.
  Its kernel is set from the training images by `Airbench94.init_from_data` (the eigenvectors
  of the 2x2 patch covariance, scaled by 1/sqrt(eigenvalue + 5e-4), and their negatives) and
  stays frozen in training (the experiment lists it in ``optimizer.frozen``).
* ``group1..3`` -> 2..4, widths 64, 256, 256: ``conv1`` (3x3 'same', no bias), 2x2 max pool,
  ``norm1``, GELU, ``conv2`` (3x3, no bias), ``norm2``, GELU (31 -> 15 -> 7 -> 3 px).
* a 3x3 max pool (3 -> 1 px), flatten, ``head`` (linear, no bias) -> 7, outputs times 1/9 -> 8.

BatchNorm has no scale parameter (airbench freezes its weight at 1; only the bias trains),
momentum 0.6 in the Flax convention (airbench's ``momentum=1-0.6`` for PyTorch) and eps 1e-12.
The 3x3 convs start as airbench's: PyTorch's default init, then ``dirac_`` on the first
``in_channels`` filters (an identity path through each conv). GELU is the exact (erf) one,
as ``torch.nn.GELU()``. 1,971,640 parameters at the default widths: airbench's 1,972,792 minus
the 1,152 BatchNorm weights it keeps frozen at 1.

Porting airbench's state_dict: ``0.weight|bias`` -> ``whiten/kernel|bias``,
``{2,3,4}.conv{1,2}.weight`` -> ``group{1,2,3}/conv{1,2}/kernel``, ``{2,3,4}.norm{1,2}.bias`` ->
``group*/norm*/bias`` (running_mean/var -> ``batch_stats`` mean/var), ``7.weight`` ->
``head/kernel``; conv weights OIHW -> HWIO by ``.transpose(2, 3, 1, 0)``, the linear weight
transposed.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.errors import ConfigError
from cnnjax.layers import BatchNorm, Conv2d, Linear, MaxPool2d, torch_uniform_init
from cnnjax.models.common import check_model_input

gelu = partial(nn.gelu, approximate=False)  # torch.nn.GELU() is the exact GELU


def dirac_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """airbench's ``Conv.reset_parameters``: PyTorch's default uniform init, then
  ``torch.nn.init.dirac_(w[:in_channels])`` (HWIO: filter i < in_channels is a centred one-hot
  on input channel i)."""
  kh, kw, cin, cout = shape
  kernel = torch_uniform_init(kh * kw * cin)(key, shape, dtype)
  n = min(cin, cout)
  identity = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2, jnp.arange(n),
                                                   jnp.arange(n)].set(1)
  return kernel.at[..., :n].set(identity)


def whitening_kernel(images: np.ndarray, kernel_size: int = 2, eps: float = 5e-4) -> np.ndarray:
  """airbench's ``init_whitening_conv`` as an HWIO kernel of ``2 * kernel_size**2 * C`` filters.

  The uncentred covariance of every ``kernel_size`` x ``kernel_size`` patch (stride 1) of the
  normalized NHWC ``images``; its eigenvectors, largest eigenvalue first, divided by
  sqrt(eigenvalue + eps), then the same filters negated. Accumulated in float64 over chunks.
  """
  images = np.asarray(images)
  n, h, w, c = images.shape
  k = kernel_size
  cov = np.zeros((k * k * c, k * k * c), np.float64)
  count = 0
  for start in range(0, n, 256):
    x = images[start:start + 256].astype(np.float64)
    patches = np.concatenate([x[:, i:h - k + 1 + i, j:w - k + 1 + j] for i in range(k)
                              for j in range(k)], axis=-1)  # (.., .., .., k*k*c) in (h, w, c) order
    flat = patches.reshape(-1, k * k * c)
    cov += flat.T @ flat
    count += len(flat)
  eigenvalues, eigenvectors = np.linalg.eigh(cov / count)
  eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
  filters = (eigenvectors / np.sqrt(eigenvalues + eps)).reshape(k, k, c, k * k * c)
  return np.concatenate([filters, -filters], axis=-1).astype(np.float32)


class ConvGroup(nn.Module):
  """conv1 -> 2x2 max pool -> norm1 -> GELU -> conv2 -> norm2 -> GELU (airbench's ConvGroup)."""
  features: int
  bn_momentum: float = 0.6
  bn_eps: float = 1e-12
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = partial(Conv2d, self.features, 3, padding=1, use_bias=False, kernel_init=dirac_init,
                   dtype=self.dtype)
    norm = partial(BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_eps, use_scale=False,
                   axis_name=self.bn_axis_name, dtype=self.dtype)
    x = MaxPool2d(2)(conv(name='conv1')(x))
    x = gelu(norm(name='norm1')(x, not train))
    return gelu(norm(name='norm2')(conv(name='conv2')(x), not train))


class Airbench94(nn.Module):
  """airbench94's network; see the module docstring. Needs inputs of at least 25x25 (CIFAR's
  32x32 is 1x1 after the last pool)."""
  num_classes: int = 10
  in_channels: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # set by pmap training: BatchNorm averages statistics over it
  widths: tuple[int, ...] = (64, 256, 256)
  whiten_kernel_size: int = 2
  bn_momentum: float = 0.6         # Flax convention (weight of the old statistic)
  bn_eps: float = 1e-12
  scaling_factor: float = 1 / 9
  whiten_images: int = 5000        # training images the whitening kernel is estimated from

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_model_input(x, 'airbench94', self.in_channels)
    k = self.whiten_kernel_size
    x = Conv2d(2 * k * k * self.in_channels, k, padding=0, bias_init=nn.initializers.zeros,
               dtype=self.dtype, name='whiten')(x)
    x = gelu(x)
    for i, width in enumerate(self.widths, start=1):
      x = ConvGroup(width, self.bn_momentum, self.bn_eps, self.bn_axis_name, self.dtype,
                    name=f'group{i}')(x, train)
    x = MaxPool2d(3)(x)
    x = x.reshape(x.shape[0], -1)
    x = Linear(self.num_classes, use_bias=False, dtype=self.dtype, name='head')(x)
    return (x * self.scaling_factor).astype(jnp.float32)

  @nn.nowrap
  def init_from_data(self, variables: Any, images: np.ndarray, mean: Sequence[float],
                     std: Sequence[float]) -> dict:
    """``variables`` with the whitening kernel estimated from the first ``whiten_images`` of
    ``images`` (uint8 NHWC training images, normalized here by ``mean``/``std`` in [0, 255]
    units, as the train step does)."""
    x = np.asarray(images[:self.whiten_images], np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
    path = 'whiten/kernel'
    kernel = whitening_kernel(x, self.whiten_kernel_size)
    if kernel.shape != flat[path].shape:
      raise ConfigError(f'airbench94: the whitening kernel from the data has shape {kernel.shape}, '
                       f'the model expects {tuple(flat[path].shape)}.')
    flat[path] = jnp.asarray(kernel, flat[path].dtype)
    return {**variables, 'params': flax.traverse_util.unflatten_dict(flat, sep='/')}
