"""One writer per workdir (cnnjax/workdir_lock.py): a second run refuses naming the holder and
changes nothing; a SIGKILLed holder leaves no stale lock; every process of a multi-host run that
finds the workdir taken refuses together."""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from cnnjax.errors import WorkdirBusyError
from cnnjax.workdir_lock import LOCK_FILE, WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parent.parent

_HOLD = """
import sys, time
from cnnjax.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print('held', flush=True)
time.sleep(600)
"""


def _snapshot(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): (p.stat().st_mtime_ns,
                                          p.read_bytes() if p.is_file() else b'')
          for p in sorted(directory.rglob('*'))}


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))


def test_a_second_holder_is_refused_with_the_pid_and_host_and_changes_nothing(tmp_path):
  with WorkdirLock(tmp_path / 'run') as lock:
    before = _snapshot(tmp_path)
    with pytest.raises(WorkdirBusyError) as error:
      WorkdirLock(tmp_path / 'run').acquire()
    assert _snapshot(tmp_path) == before
    message = str(error.value)
    assert f'pid {os.getpid()} on host {socket.gethostname()} since ' in message
    assert f'the workdir {tmp_path / "run"} is in use by another run' in message
    assert '\n' not in message
    assert lock.path == tmp_path / 'run' / LOCK_FILE
  with WorkdirLock(tmp_path / 'run'):  # released: the next run takes it
    pass


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', _HOLD, str(tmp_path)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(WorkdirBusyError, match=f'pid {holder.pid} on host'):
      WorkdirLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait(timeout=60)
  assert holder.returncode == -signal.SIGKILL
  assert str(holder.pid) in (tmp_path / LOCK_FILE).read_text()  # its note is still there...
  with WorkdirLock(tmp_path):  # ...but the kernel dropped its lock: taken over at once
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()


def test_run_py_in_a_busy_workdir_exits_2_in_one_sentence_touching_nothing(tmp_path):
  workdir = tmp_path / 'busy'
  with WorkdirLock(workdir):
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, 'run.py', '--workdir', str(workdir),
                           '--config.train.num_epochs=2'], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert _snapshot(tmp_path) == before  # no checkpoints/, metrics, tensorboard: nothing
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: the workdir '), proc.stderr[-2000:]
  assert f'in use by another run (pid {os.getpid()} on host {socket.gethostname()}' in lines[0]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_every_process_of_a_multi_host_run_refuses_a_busy_workdir(tmp_path):
  """Process 0 finds the lock taken and tells process 1: both stop with the same error and
  neither waits for the other (tests/test_multihost.py shows a run's own processes share it)."""
  port = _free_port()
  with WorkdirLock(tmp_path):
    procs = [subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'test_multihost.py'),
                               str(tmp_path), '2', str(i), str(port), 'jit'], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    deadline = time.time() + 300
    outputs = []
    for proc in procs:
      try:
        outputs.append(proc.communicate(timeout=max(deadline - time.time(), 1)))
      except subprocess.TimeoutExpired:
        for p in procs:
          p.kill()
        raise
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode != 0 and 'RESULT' not in out, err[-2000:]
    assert f'WorkdirBusyError: the workdir {tmp_path} is in use by another run (pid ' \
        f'{os.getpid()}' in err, err[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
