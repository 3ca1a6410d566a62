"""Pictures of training and of what a network learned, written as PNG files.

* `plot_curves`: train/test loss and accuracy against step (from metrics.jsonl rows);
* `plot_activations`: one layer's feature maps for one image, a grid of channels;
* `plot_filters`: the first convolution's kernels (RGB when the input has 3 channels);
* `confusion_matrix` + `plot_confusion_matrix`: which classes get mistaken for which.

Every function takes host arrays (NumPy or JAX), writes one PNG and returns its path; none
touches the model, so notebooks and the CLI (`cnnjax.inspect_run`) share them.
"""
from __future__ import annotations

import math
import pathlib
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(rows: list[dict], path: str | pathlib.Path) -> pathlib.Path:
  """Train/test loss and accuracy against step, from metrics.jsonl rows."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for split, style in (('train', '-'), ('test', 'o-')):
    points = [r for r in rows if r.get('split') == split]
    if not points:
      continue
    steps = [r['step'] for r in points]
    ax_loss.plot(steps, [r['loss'] for r in points], style, label=split)
    ax_acc.plot(steps, [r['accuracy'] for r in points], style, label=split)
  ax_loss.set(xlabel='step', ylabel='cross-entropy loss', title='loss')
  ax_acc.set(xlabel='step', ylabel='top-1 accuracy', title='accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  return _save(fig, path)


def plot_activations(activations, path: str | pathlib.Path, image=None, title: str = '',
                     max_maps: int = 64) -> pathlib.Path:
  """A grid of one layer's feature maps for one image, each channel scaled to its own range.

  Args:
    activations: (H, W, C) or (1, H, W, C) feature maps, or (F,) / (1, F) features of a dense
      layer (drawn as bars).
    path: the PNG to write.
    image: optionally the (H, W, 1|3) input image, drawn first.
    title: figure title (e.g. the layer name).
    max_maps: at most this many channels are drawn (the first ones).
  """
  maps = np.asarray(activations, np.float32)
  if maps.ndim in (2, 4):
    if maps.shape[0] != 1:
      raise ValueError(f'plot_activations draws one image; got a batch of {maps.shape[0]}.')
    maps = maps[0]
  if maps.ndim == 1:
    return _plot_features(maps, path, image, title)
  if maps.ndim != 3:
    raise ValueError(f'activations must be (H, W, C) feature maps or (F,) features, got shape '
                     f'{tuple(np.shape(activations))}.')
  channels = min(maps.shape[-1], max_maps)
  panels = channels + (image is not None)
  cols = math.ceil(math.sqrt(panels))
  rows = math.ceil(panels / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(max(1.6 * cols, 6.5), 1.6 * rows + 0.5),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  flat = list(axes.flat)
  if image is not None:
    _show_image(flat.pop(0), image, 'input')
  for c in range(channels):
    flat[c].imshow(maps[..., c], cmap='viridis', interpolation='nearest')
    flat[c].set_title(str(c), fontsize=7)
  shown = f'first {channels} of {maps.shape[-1]}' if channels < maps.shape[-1] else f'{channels}'
  fig.suptitle(f'{title}  ({maps.shape[0]}x{maps.shape[1]}, {shown} channels)'.strip(),
               fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_filters(kernel, path: str | pathlib.Path, title: str = 'first-layer filters',
                 max_filters: int = 64) -> pathlib.Path:
  """The kernels of a convolution, one panel per output channel.

  `kernel` is HWIO (kh, kw, in, out). Three input channels are drawn as RGB, each filter scaled
  to [0, 1] by its own min and max; otherwise each filter's first input channel in grey.
  """
  kernel = np.asarray(kernel, np.float32)
  if kernel.ndim != 4:
    raise ValueError(f'plot_filters needs an HWIO convolution kernel, got shape {kernel.shape}.')
  count = min(kernel.shape[-1], max_filters)
  cols = math.ceil(math.sqrt(count))
  rows = math.ceil(count / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(max(1.2 * cols, 5.0), 1.2 * rows + 0.5),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  rgb = kernel.shape[2] == 3
  for i, ax in zip(range(count), axes.flat):
    w = kernel[..., i] if rgb else kernel[..., 0, i]
    lo, hi = w.min(), w.max()
    w = (w - lo) / (hi - lo) if hi > lo else np.zeros_like(w)
    ax.imshow(w, cmap=None if rgb else 'gray', interpolation='nearest')
  kh, kw, cin, cout = kernel.shape
  fig.suptitle(f'{title}  ({cout} filters, {kh}x{kw}x{cin}'
               f'{", RGB" if rgb else "" if cin == 1 else ", input channel 0"})', fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) counts: row = true class, column = predicted class."""
  labels = np.asarray(labels, np.int64).ravel()
  predictions = np.asarray(predictions, np.int64).ravel()
  if labels.shape != predictions.shape:
    raise ValueError(f'{labels.size} labels but {predictions.size} predictions.')
  for name, values in (('labels', labels), ('predictions', predictions)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f'{name} must lie in [0, {num_classes}), got values from {values.min()} '
                       f'to {values.max()}.')
  counts = np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
  return counts.reshape(num_classes, num_classes)


def plot_confusion_matrix(matrix, path: str | pathlib.Path,
                          class_names: Sequence[str] | None = None,
                          title: str = 'confusion matrix') -> pathlib.Path:
  """The matrix as a heat map, rows normalized (recall per class), counts written in the cells
  when there are at most 20 classes."""
  matrix = np.asarray(matrix)
  n = matrix.shape[0]
  names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
  totals = matrix.sum(axis=1, keepdims=True)
  recall = matrix / np.maximum(totals, 1)
  size = min(max(4.0, 0.45 * n + 2), 16.0)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  im = ax.imshow(recall, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  if n <= 20:
    ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(n), names)
    for i in range(n):
      for j in range(n):
        if matrix[i, j]:
          ax.text(j, i, str(int(matrix[i, j])), ha='center', va='center', fontsize=8,
                  color='white' if recall[i, j] > 0.5 else 'black')
  accuracy = np.trace(matrix) / max(matrix.sum(), 1)
  ax.set(xlabel='predicted class', ylabel='true class',
         title=f'{title}  (accuracy {accuracy:.2%} of {int(matrix.sum())})')
  fig.tight_layout()
  return _save(fig, path)


def _plot_features(features: np.ndarray, path, image, title: str) -> pathlib.Path:
  fig, axes = plt.subplots(1, 2 if image is not None else 1, figsize=(10, 3), squeeze=False,
                           gridspec_kw={'width_ratios': [1, 4]} if image is not None else None)
  axes = list(axes.flat)
  if image is not None:
    _show_image(axes.pop(0), image, 'input')
  axes[0].bar(np.arange(features.size), features, width=1.0)
  axes[0].set(xlabel='feature', ylabel='activation', title=f'{title} ({features.size} features)')
  fig.tight_layout()
  return _save(fig, path)


def _show_image(ax, image, title: str) -> None:
  image = np.asarray(image)
  if image.ndim == 4:
    image = image[0]
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray')
  else:
    image = image.astype(np.float32)
    if image.max() > 1.0:
      image = image / 255.0
    ax.imshow(np.clip(image, 0, 1))
  ax.set_title(title, fontsize=8)
  ax.axis('off')


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
