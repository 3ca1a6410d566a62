"""The training loop on streamed data: exact resume after SIGKILL with worker processes, and a
stream of in-memory arrays training exactly like the in-memory fast path.

Real runs in subprocesses (`runner.run`, as tests/test_checkpoint.py does for in-memory data),
on a folder of JPEGs of varied sizes written from mnist5k's digits 0 and 1.
"""
from __future__ import annotations

import json
import random
import signal

import chex
import pytest

from cnnjax import checkpoint
from cnnjax.data import demo_folder, load_dataset
from tests import test_checkpoint as runs

STEPS, EVERY = 30, 3
COMMON = ['model.name=convnet', 'train.batch_size=32', f'train.num_steps={STEPS}',
          'train.progress_bar=false', 'train.log_every_steps=5', 'optimizer.name=adam',
          'optimizer.lr=0.003', 'checkpoint.keep=2']


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  """800 train / 200 test JPEGs (28-64 px) of digits 0 and 1: 25 steps of 32 per epoch."""
  root = tmp_path_factory.mktemp('digits')
  return demo_folder.write_digits(root, load_dataset('mnist5k').select_classes((0, 1)))


def _start(workdir, overrides):
  import subprocess
  import sys
  return subprocess.Popen([sys.executable, '-c', runs._RUN, str(workdir), json.dumps(overrides)],
                          cwd=runs.REPO, env=runs._env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final(workdir):
  variables, step_dir = checkpoint.load_variables(workdir / 'checkpoints' / str(STEPS))
  assert step_dir.name == str(STEPS)
  return variables


@pytest.mark.slow
def test_streamed_run_resumes_exactly_after_sigkill_with_workers(tmp_path, digits):
  overrides = COMMON + [f'data.name=folder:{digits}', 'data.image_size=16', 'data.workers=2',
                        'data.crop_scale=(0.35,1.0)', 'data.flip=true',
                        f'checkpoint.every_steps={EVERY}']
  reference = tmp_path / 'uninterrupted'
  out = runs._finish(_start(reference, overrides))
  assert 'streamed as 16x16x1 by 2 worker(s)' in out
  expected = _final(reference)
  assert (reference / 'checkpoints' / str(STEPS) / 'data').is_dir()  # the loader's state
  _visualize_counts_what_evaluation_counted(reference, overrides)

  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  kill_at, delay = rng.randrange(EVERY, 21, EVERY), rng.uniform(0, 0.5)  # mid-step or mid-save
  workdir = tmp_path / 'interrupted'
  code, out = runs._interrupt_after_checkpoint(_start(workdir, overrides), workdir,
                                               kill_at, signal.SIGKILL, delay)
  assert code == -signal.SIGKILL, f'the run ended before it was killed (seed {seed}):\n{out[-2000:]}'
  left = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  saved = json.loads((workdir / 'checkpoints' / str(left) / 'data' / 'metadata').read_text())
  assert (saved['next_step'], saved['workers']) == (left, 2) and 'grain' in saved  # resumed from
  out = runs._finish(_start(workdir, overrides))
  assert f'resumed from step {left}' in out or left == STEPS, out[-2000:]
  chex.assert_trees_all_equal(_final(workdir), expected,
                              custom_message=f'killed at {kill_at}+{delay:.2f}s, seed {seed}')


def _visualize_counts_what_evaluation_counted(workdir, overrides):
  """`--visualize` on a streamed run: the test images come through the loader, and the
  confusion matrix holds the predictions the run's last evaluation scored."""
  from cnnjax import config as config_lib, inspect_run
  config = config_lib.base_config()
  config.model.kwargs.widths = (4, 8, 8)
  config.model.kwargs.hidden = 16
  config_lib.apply_overrides(config, overrides)
  paths = inspect_run.visualize(config, workdir, 'conv2', image_index=199)
  assert all(path.stat().st_size > 1000 for path in paths.values())
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  tested = [r for r in rows if r['split'] == 'test'][-1]
  labels, predictions = inspect_run.predict(*inspect_run.load_trained(config, workdir)[:3],
                                            batch_size=64)
  assert len(labels) == 200
  assert (labels == predictions).mean() == pytest.approx(tested['accuracy'])


@pytest.mark.slow
def test_a_stream_of_in_memory_arrays_trains_exactly_like_the_fast_path(tmp_path):
  """mnist5k digits 0/1 through the grain loader (2 workers, stored size, on-device crop)
  end with the in-memory run's parameters, bit for bit."""
  overrides = COMMON + ['data.name=mnist5k', 'data.crop_padding=2', 'checkpoint.every_steps=0']
  results = {}
  for pipeline in ('memory', 'stream'):
    workdir = tmp_path / pipeline
    out = runs._finish(_start(workdir, overrides + [f'data.pipeline={pipeline}',
                                                          'data.workers=2']))
    assert ('streamed as 28x28x1' in out) == (pipeline == 'stream'), out[-2000:]
    results[pipeline] = _final(workdir)
  chex.assert_trees_all_equal(results['stream'], results['memory'])
