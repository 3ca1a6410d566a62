"""Where metrics go: `<workdir>/metrics.jsonl` (one JSON object a line), TensorBoard events, and
the run's one-line summary.

Only process 0 writes (`enabled=False` elsewhere), so multi-host runs write one set of files.
`summarize` turns a run's evaluations into its result: the best comes from the checkpoints' own
metrics (the best checkpoint by `checkpoint.best_metric` is always kept), so it stays true
across resumes, and a rate that was not measured is None, never NaN.
"""
from __future__ import annotations

import json
import math
import pathlib

from cnnjax.errors import TrainingError


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
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    except OSError as e:  # a full disk or a lost filesystem: the user's to fix, not a bug
      raise TrainingError(f'cannot write {self.path} ({e.strerror}); the checkpoints are kept: '
                          f'fix it and rerun the same command to resume.') from None
    for name, value in row.items():
      if name not in ('step', 'split') and math.isfinite(value):
        self._tb.add_scalar(f'{split}/{name}', value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> 'Recorder':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def named_test_metrics(evaluation: dict, split: str = 'test') -> dict[str, float]:
  """{'test_loss', 'test_accuracy', 'test_top5_accuracy'} of an `evaluate` result: the names the
  checkpoints store and `checkpoint.best_metric` chooses from (`split='test_ema'`: the moving
  average of the weights, 'test_ema_accuracy' and so on)."""
  return {f'{split}_{k}': float(v) for k, v in evaluation.items() if k not in ('count', 'step')}


def summarize(step: int, evaluations: dict[int, dict], best_metric: str, minimize: bool,
              preempted: bool, train_steps: int, images_per_second: float | None,
              **extra) -> dict:
  """The result of a run that stopped at `step`.

  `evaluations` maps steps to test metrics (`named_test_metrics` names): the checkpoints' and this
  run's. The best is the smallest or largest `best_metric` among them ('' = no best).
  """
  final = evaluations.get(step)
  last = max(evaluations) if evaluations else None
  best = None
  ranked = [s for s, m in evaluations.items() if best_metric and best_metric in m]
  if ranked:  # ties go to the newest step, as orbax's BestN keeps it
    if minimize:
      best = min(ranked, key=lambda s: (evaluations[s][best_metric], -s))
    else:
      best = max(ranked, key=lambda s: (evaluations[s][best_metric], s))
  return {
      **extra, 'steps': step, 'preempted': preempted,
      'final_test_accuracy': final.get('test_accuracy') if final else None,
      'final_test_ema_accuracy': final.get('test_ema_accuracy') if final else None,
      'last_evaluation_step': last,
      'last_test_accuracy': evaluations[last].get('test_accuracy') if last is not None else None,
      'best_metric': best_metric or None, 'best_step': best,
      'best_value': evaluations[best][best_metric] if best is not None else None,
      'best_test_accuracy': evaluations[best].get('test_accuracy') if best is not None else None,
      'train_steps': train_steps, 'train_images_per_second': images_per_second,
  }


def _value(metric: str, value: float) -> str:
  return f'{value:.2%}' if metric.endswith('accuracy') else f'{value:.4f}'


def summary_line(result: dict, workdir: str | pathlib.Path) -> str:
  """'quickstart: finished step 124; test accuracy final 97.40%, best 97.40% (step 124); 28.1 s
  wall, 743 train images/s; outputs in runs/quickstart'."""
  step = result['steps']
  head = f"{result.get('experiment') or 'run'}: "
  head += f'preempted at step {step}' if result['preempted'] else f'finished step {step}'
  if result['final_test_accuracy'] is not None:
    test = f"test accuracy final {result['final_test_accuracy']:.2%}"
    if result.get('final_test_ema_accuracy') is not None:
      test += f" (EMA weights {result['final_test_ema_accuracy']:.2%})"
  elif result['last_test_accuracy'] is not None:
    test = (f'not evaluated at step {step} (test accuracy {result["last_test_accuracy"]:.2%} at '
            f'step {result["last_evaluation_step"]})')
  else:
    test = 'not evaluated yet'
  if result['best_step'] is not None:
    metric = result['best_metric']
    name = '' if metric == 'test_accuracy' else f'{metric} '
    test += f", best {name}{_value(metric, result['best_value'])} (step {result['best_step']})"
  if not result['train_steps']:
    rate = 'no training steps run'
  elif result['train_images_per_second'] is None:
    rate = f"{result['train_steps']} training steps (too few to time)"
  else:
    rate = f"{result['train_images_per_second']:.0f} train images/s"
  return (f"{head}; {test}; {result['wall_seconds']:.1f} s wall, {rate}; outputs in {workdir}")
