"""What the benchmark workers share: the model list, timing statistics, memory, the result line.

Every worker is a separate process (so compile caches, thread pools and peak memory of JAX and
PyTorch never mix) that prints exactly one line starting with ``RESULT `` followed by JSON.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time

# name -> input (H, W, C), as in the performance issue.
MODELS = {
    'lenet5': (28, 28, 1),
    'tutorial_net': (32, 32, 3),
    'small_resnet': (32, 32, 3),
    'cifar_resnet18': (32, 32, 3),
}
NUM_CLASSES = 10
RESULT_PREFIX = 'RESULT '


def emit(result: dict) -> None:
  """Prints the worker's result line (the orchestrator reads only this line)."""
  sys.stdout.write(RESULT_PREFIX + json.dumps(result) + '\n')
  sys.stdout.flush()


def parse(stdout: str) -> dict:
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise ValueError('the worker printed no RESULT line')


def time_steps(step, n: int, warmup: int, budget_s: float | None = None,
               min_steps: int = 5) -> list[float]:
  """Seconds per call of ``step()`` (which must block until its work is done), after warm-up.

  Times ``n`` calls, or stops early once ``budget_s`` seconds are spent (after at least
  ``min_steps`` calls), so a slow model does not take minutes per measurement.
  """
  for _ in range(warmup):
    step()
  times = []
  began = time.perf_counter()
  for _ in range(n):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    if budget_s is not None and len(times) >= min_steps and start - began >= budget_s:
      break
  return times


def summarize(times: list[float], batch: int) -> dict:
  """Median and best step time and the images/s they mean."""
  med = statistics.median(times)
  return {'step_ms': round(1e3 * med, 3), 'best_step_ms': round(1e3 * min(times), 3),
          'images_per_s': round(batch / med, 1), 'batch': batch, 'steps_timed': len(times)}


def load_average() -> list[float] | None:
  """1, 5 and 15 minute load averages: other processes competing for the cores skew timings."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def reset_peak_rss() -> bool:
  """Restarts the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_mb() -> float | None:
  """Peak resident memory of this process since start (or the last `reset_peak_rss`), in MiB."""
  try:
    with open('/proc/self/status') as f:
      match = re.search(r'VmHWM:\s+(\d+) kB', f.read())
    return round(int(match.group(1)) / 1024, 1) if match else None
  except OSError:
    import resource  # not Linux: lifetime peak only (kB on Linux, bytes on macOS)
    scale = 1 if sys.platform == 'darwin' else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)
