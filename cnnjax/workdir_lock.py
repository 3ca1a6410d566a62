"""One writer per workdir: a run holds `<workdir>/run.lock` while it trains.

`hold(workdir)` takes an exclusive `flock` on the lock file before the run writes anything, and
raises `WorkdirBusyError` naming the holder (pid, host, start time, command) when another live
run has it, without changing any file. The kernel drops a flock when its process ends in any way
(exit, crash, SIGKILL), so a killed run leaves no stale lock: the next run takes it over, and only
then cleans up what the killed run left (orbax's half-written checkpoint directories). The file
itself stays (removing a lock file races with a run that has just opened it); its JSON content
only names the holder for the message.

Shared filesystems: on NFS, Linux turns a flock into a POSIX lock the server arbitrates, so runs
on two hosts sharing a workdir exclude each other too; if the holding host crashes, the server
releases its lock when the client's lease ends (about 90 s on NFSv4). A filesystem that has no
locks (NFS mounted with `nolock`, some FUSE filesystems) gets a warning and no protection.

Multi-host runs share one workdir: only process 0 takes the lock, and it tells the others (one
small broadcast) whether the workdir was free, so every process of a refused run raises the same
error together and no process of a run is refused by its own run.

Reading a run does not take the lock: `--visualize` and `transfer.init_from` read only committed
checkpoints (orbax renames a step directory into place when it is complete) and write elsewhere.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
import warnings

import numpy as np

from cnnjax.errors import ConfigError, WorkdirBusyError

LOCK_FILE = 'run.lock'
_MESSAGE_BYTES = 2048  # the refusal sentence process 0 broadcasts to the other processes


class WorkdirLock:
  """An exclusive, non-blocking lock on `<workdir>/run.lock` (a context manager)."""

  def __init__(self, workdir: str | pathlib.Path):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusyError naming its holder (changing no file)."""
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ConfigError(f'cannot write to the workdir {self.workdir} ({e.strerror}); pass a '
                        f'--workdir this user can write.') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirBusyError(
            f'the workdir {self.workdir} is in use by another run ({holder}); wait for it to '
            f'finish, stop it, or pass another --workdir.') from None
      os.close(fd)  # ENOLCK, EOPNOTSUPP...: the filesystem has no locks
      warnings.warn(f'cannot lock {self.path} ({e.strerror}): this filesystem has no file '
                    f'locks, so nothing stops a second run from writing the same workdir.')
      return
    info = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'command': ' '.join(sys.argv)}
    self._fd = fd
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(info) + '\n').encode(), 0)
    except OSError:  # a full disk: the lock holds all the same, only the message loses its names
      pass

  def release(self) -> None:
    if self._fd is not None:
      with contextlib.suppress(OSError):
        os.ftruncate(self._fd, 0)  # no stale holder in the file; the lock itself is what counts
      os.close(self._fd)  # closing drops the flock
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  """'pid 123 on host h since <time>: <command>' from the holder's JSON (which it writes just
  after locking, so a run that has only just started may need a moment)."""
  for _ in range(20):
    try:
      info = json.loads(os.pread(fd, 4096, 0).decode() or 'null')
    except (ValueError, UnicodeDecodeError):
      info = None
    if isinstance(info, dict) and 'pid' in info:
      command = f': {info["command"]}' if info.get('command') else ''
      return (f'pid {info["pid"]} on host {info.get("host", "?")} since '
              f'{info.get("started", "?")}{command}')
    time.sleep(0.05)
  return 'a process that has not written its pid and host yet'


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path):
  """Holds the workdir for this run (process 0 of a multi-host run holds it for all)."""
  import jax  # late: the lock itself needs no JAX
  lock = WorkdirLock(workdir)
  error: Exception | None = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except (WorkdirBusyError, ConfigError) as e:
      error = e
  if jax.process_count() > 1:
    error = _share(error)
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()


def _share(error: Exception | None) -> Exception | None:
  """Process 0's refusal (or None), given to every process."""
  from jax.experimental import multihost_utils
  message = np.zeros(_MESSAGE_BYTES, np.uint8)
  if error is not None:
    kind = b'B' if isinstance(error, WorkdirBusyError) else b'C'
    text = (kind + str(error).encode())[:_MESSAGE_BYTES]
    message[:len(text)] = np.frombuffer(text, np.uint8)
  message = np.asarray(multihost_utils.broadcast_one_to_all(message))
  if not message[0]:
    return None
  if error is not None:
    return error
  text = message.tobytes().rstrip(b'\0').decode(errors='replace')
  return (WorkdirBusyError if text[0] == 'B' else ConfigError)(text[1:])
