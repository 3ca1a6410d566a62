"""Where metrics go: `<workdir>/metrics.jsonl` (one JSON object a line) and TensorBoard events.

Only process 0 writes (`enabled=False` elsewhere), so multi-host runs write one set of files.
"""
from __future__ import annotations

import json
import math
import pathlib


class Recorder:

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Appends `{'step', 'split', **metrics}` to metrics.jsonl and logs `split/name` scalars."""
    if not self.enabled:
      return
    row = {'step': int(step), 'split': split}
    row.update({k: float(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    for name, value in row.items():
      if name not in ('step', 'split') and math.isfinite(value):
        self._tb.add_scalar(f'{split}/{name}', value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
