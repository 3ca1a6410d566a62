"""A checkpoint save that fails never hangs and loses nothing: an error injected into orbax's
background write, and a real full disk (a small tmpfs) under `python run.py`, which stops with one
sentence naming the directory, keeps every earlier checkpoint restorable, and resumes to the
same weights as an uninterrupted run once there is space again."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import pytest
from test_run import TINY

from cnnjax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent

_INJECTED = """
import errno, sys, threading, time
sys.path.insert(0, sys.argv[2])
import orbax.checkpoint as ocp
from tests.test_checkpoint import ckpt_config, fake_step, make_state
from cnnjax import checkpoint
from cnnjax.errors import TrainingError

class FailingWrite:  # a commit future whose write fails a moment later, in the background
  def result(self, timeout=None):
    time.sleep(0.2)
    raise OSError(errno.EIO, 'Input/output error')
  def cancel(self):
    pass

original, calls = ocp.StandardCheckpointHandler.async_save, []
async def async_save(self, *args, **kwargs):
  futures = list(await original(self, *args, **kwargs) or [])
  calls.append(1)
  return futures + [FailingWrite()] if len(calls) == 2 else futures
ocp.StandardCheckpointHandler.async_save = async_save

ckpts = checkpoint.Checkpoints(sys.argv[1], ckpt_config(best_metric=''))
state = make_state()
try:
  for step in (1, 2, 3):
    state = fake_step(state)
    ckpts.save(step, state)
  ckpts.close()
except TrainingError as e:
  print('ERROR', e)
print('STEPS', ckpts.all_steps(), sorted(p.name for p in ckpts.directory.iterdir()))
print('THREADS', [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon
                  and t is not threading.main_thread()])
"""


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  return env


def test_a_failed_background_save_is_one_error_and_the_process_exits(tmp_path):
  proc = subprocess.run([sys.executable, '-c', _INJECTED, str(tmp_path), str(ROOT)], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = dict(line.split(' ', 1) for line in proc.stdout.splitlines() if ' ' in line)
  assert lines['ERROR'].startswith(f'saving step 2 in {tmp_path} failed (OSError: [Errno 5] '
                                   f'Input/output error); the checkpoints before it are intact '
                                   f'(newest: step 1)'), proc.stdout
  assert lines['STEPS'] == "[1] ['1']", proc.stdout  # no half-written step 2 left behind
  assert lines['THREADS'] == '[]', proc.stdout       # nothing left to keep the process alive
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]  # orbax's logged ones are dropped
  assert checkpoint.load_variables(tmp_path)[1].name == '1'


def test_asyncio_reports_of_an_uncommitted_steps_writes_are_dropped(caplog):
  """A write awaited only through tensorstore's futures reaches asyncio's "never retrieved"
  report with no orbax frame in its traceback (seen in CI after the run's one sentence): the
  step directory's name in the error is what marks it as the failed save's."""
  from cnnjax import checkpoint_failures
  partial = ValueError('RESOURCE_EXHAUSTED: Error writing "/run/checkpoints/12'
                       f'{checkpoint_failures.TMP_MARK}/state/d/c1": No space left on device')
  unrelated = ValueError('a failure of the user\'s own asyncio code')
  loop = asyncio.new_event_loop()
  try:
    with caplog.at_level(logging.ERROR, logger='asyncio'), checkpoint_failures.QuietOrbax():
      for error in (partial, unrelated):
        loop.call_exception_handler({'message': 'Task exception was never retrieved',
                                     'exception': error})
  finally:
    loop.close()
  reported = [record.exc_info[1] for record in caplog.records if record.name == 'asyncio']
  assert reported == [unrelated]


# ---------------------------------------------------------------------------------------------
# A real full disk under a training run.

STEPS = 30  # TINY's: a checkpoint every 3 steps, keep=2


def _run_py(workdir, **kwargs):
  return subprocess.Popen([sys.executable, 'run.py', '--workdir', str(workdir), *TINY], cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)


def _finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def _committed(directory):
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (root only; skipped where mounting is not permitted)."""
  if os.geteuid() != 0:
    pytest.skip('mounting a small filesystem needs root')
  mount = tmp_path / 'disk'
  mount.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {done.stderr.strip()}')
  try:
    yield mount
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


def _fill(directory: pathlib.Path) -> pathlib.Path:
  filler = directory / 'filler'
  with open(filler, 'ab', buffering=0) as f:  # unbuffered: nothing is left to fail at close
    try:
      while True:
        f.write(b'\0' * 65536)
    except OSError as e:
      assert e.errno == errno.ENOSPC, e
  return filler


@pytest.mark.slow
def test_disk_full_during_a_save_stops_cleanly_and_resumes_to_the_same_weights(tmp_path,
                                                                               small_disk):
  reference = tmp_path / 'uninterrupted'
  _finish(_run_py(reference))
  expected, _ = checkpoint.load_variables(reference / 'checkpoints' / str(STEPS))

  # The checkpoints live on the small disk (as on a separate scratch volume); the rest of the
  # workdir does not, so the first write to fail is a checkpoint's.
  (small_disk / 'checkpoints').mkdir()
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'checkpoints').symlink_to(small_disk / 'checkpoints')
  directory = workdir / 'checkpoints'
  proc = _run_py(workdir)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if any(step >= 9 for step in _committed(directory)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGSTOP)  # hold it still while the disk fills up
  before = _committed(directory)
  filler = _fill(small_disk)
  proc.send_signal(signal.SIGCONT)
  deadline = time.time() + 300  # a failed save must not hang the process
  while proc.poll() is None and time.time() < deadline:
    _fill(small_disk)  # keep it full: space that orbax frees by deleting an old step is taken
    time.sleep(0.02)
  out, err = proc.communicate(timeout=10)

  assert proc.returncode == 2, (out[-2000:], err[-3000:])
  assert before and max(before) < STEPS, f'the run got past its saves first: {before}'
  # One sentence, whichever way the disk ran out: during a write in the background (orbax's
  # event loops may also print tracebacks for the writes still in flight), or before one.
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
  assert errors[0].startswith('error: saving step ') and f' in {directory} ' in errors[0]
  assert ('failed (no space left on the device)' in errors[0]
          or ' MiB are free' in errors[0]), errors[0]
  assert 'the checkpoints before it are intact (newest: step ' in errors[0], errors[0]
  after = _committed(directory)
  assert max(after) >= max(before) and len(after) >= 2, (before, after)  # keep=2: none deleted
  assert not [p.name for p in directory.iterdir() if 'tmp' in p.name]    # no half-written step
  for step in after:
    variables, _ = checkpoint.load_variables(directory / str(step))
    assert variables['params'], step

  # Rerun before freeing space: refused before orbax writes anything, in one clean sentence.
  _fill(small_disk)
  proc = _run_py(workdir)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, (out[-2000:], err[-3000:])
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in err, err[-3000:]
  assert errors[0].startswith(f'error: saving step {max(after) + 3} in {directory} needs about ')
  assert f' MiB are free; the checkpoints before it are intact (newest: step {max(after)})' \
      in errors[0], errors[0]
  assert _committed(directory) == after

  filler.unlink()  # space again: the same command resumes and ends where it would have
  out = _finish(_run_py(workdir))
  assert f'resumed from step {max(after)}' in out, out[-2000:]
  resumed, _ = checkpoint.load_variables(directory / str(STEPS))
  chex.assert_trees_all_equal(resumed, expected)
