"""Pictures of training and of what a network learned, written as PNG files."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


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
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
