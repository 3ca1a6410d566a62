"""Multi-host training: 2 processes x 2 CPU devices (gloo on 127.0.0.1) train exactly like one
process with 4 devices, through the real loop (`runner.run`), from in-memory data and streamed.

Each process feeds only its rows of every global batch; only process 0 writes metrics and
prints; the checkpoint is written by both processes through orbax. The processes are this file
run as a script: `python tests/test_multihost.py WORKDIR NUM_PROCESSES PROCESS_ID PORT MODE`
(MODE 'jit' here; 'pmap' works the same way by hand: 2 x 2 devices matched 1 x 4 exactly).
MODE 'jit+stream' then trains again in WORKDIR-stream with the same data streamed through the
grain loader (`data.pipeline=stream`), recording which rows of each split the process read.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 4
STEPS = 4


def _child(workdir: str, num_processes: int, process_id: int, port: int, mode: str) -> None:
  import jax
  jax.config.update('jax_num_cpu_devices', DEVICES // num_processes)
  if num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  from cnnjax import config as config_lib
  from cnnjax import runner
  from cnnjax.data import loader

  mode, _, streamed = mode.partition('+')
  config = config_lib.load_experiment('quickstart', [
      f'train.num_steps={STEPS}', 'train.batch_size=32', 'train.eval_batch_size=500',
      f'train.eval_every_steps={STEPS}', 'train.log_every_steps=2', 'train.progress_bar=false',
      f'parallel.mode={mode}'])
  config.model.kwargs.widths = (4, 8, 8)   # tiny: compile time is what this test pays
  config.model.kwargs.hidden = 8
  if num_processes > 1:
    config.parallel.coordinator_address = f'127.0.0.1:{port}'
    config.parallel.num_processes = num_processes
    config.parallel.process_id = process_id
  result = runner.run(config, workdir)
  print('RESULT ' + json.dumps({'process': jax.process_index(), 'processes': jax.process_count(),
                                'devices': jax.device_count(), **result}))
  if streamed:
    read = {}  # split size -> rows the loader read (data.workers=0: it reads in this process)
    real_load = loader.Examples._load

    def load(examples, row, rng):
      read.setdefault(str(len(examples.source)), []).append(int(row))
      return real_load(examples, row, rng)

    loader.Examples._load = load
    config_lib.apply_overrides(config, ['data.pipeline=stream', 'data.workers=0'])
    result = runner.run(config, f'{workdir}-stream')
    print('STREAMED ' + json.dumps({**result, 'read': read}))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Starts the 2-process run and the 1-process reference at once; returns their outputs."""
  root = tmp_path_factory.mktemp('multihost')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  port = _free_port()
  commands = {'multi0': (root / 'multi', 2, 0), 'multi1': (root / 'multi', 2, 1),
              'single': (root / 'single', 1, 0)}
  modes = {'multi0': 'jit+stream', 'multi1': 'jit+stream', 'single': 'jit'}
  # The reference runs at a lower priority: the two gloo peers must reach each new collective
  # within gloo's 30 s rendezvous timeout of each other, so they get the CPU first.
  procs = {name: subprocess.Popen(
      [sys.executable, __file__, str(workdir), str(n), str(pid), str(port), modes[name]], cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=(lambda: os.nice(10)) if n == 1 else None)
      for name, (workdir, n, pid) in commands.items()}
  outputs = {}
  for name, proc in procs.items():
    try:
      out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for p in procs.values():
        p.kill()
      raise
    assert proc.returncode == 0, f'{name} failed:\n{err[-4000:]}'
    result = [json.loads(line[7:]) for line in out.splitlines() if line.startswith('RESULT ')]
    streamed = [json.loads(line[9:]) for line in out.splitlines() if line.startswith('STREAMED ')]
    outputs[name] = {'stdout': out, 'result': result[0], 'workdir': commands[name][0],
                     'streamed': streamed[0] if streamed else None}
  return outputs


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_processes_see_one_global_run(runs):
  for name, processes in (('multi0', 2), ('multi1', 2), ('single', 1)):
    result = runs[name]['result']
    assert (result['processes'], result['devices']) == (processes, DEVICES), name
  assert runs['multi0']['result']['process'] == 0 and runs['multi1']['result']['process'] == 1
  assert 'devices: 4 x cpu (jit) on 2 host(s); global batch 32, 8 per device' in \
      runs['multi0']['stdout']


def test_two_hosts_train_like_one_host_with_the_same_devices(runs):
  multi, single = _metrics(runs['multi0']['workdir']), _metrics(runs['single']['workdir'])
  assert [(r['step'], r['split']) for r in multi] == [(r['step'], r['split']) for r in single]
  assert len(single) == STEPS // 2 + 1  # train rows every 2 steps, one test row
  for m, s in zip(multi, single):
    for key in ('loss', 'accuracy'):
      assert abs(m[key] - s[key]) <= 1e-5 * abs(s[key]) + 1e-7, (m, s)
  assert multi[-1]['count'] == 1000  # every test example once, split over the two hosts
  for name in ('multi0', 'multi1'):
    assert runs[name]['result']['final_test_accuracy'] == runs['single']['result'][
        'final_test_accuracy']


def test_only_process_zero_writes_and_prints(runs):
  assert 'test accuracy final' in runs['multi0']['stdout']
  assert 'test accuracy final' not in runs['multi1']['stdout']
  assert 'devices:' not in runs['multi1']['stdout']


def test_the_cooperative_checkpoint_holds_the_same_weights(runs):
  import jax
  from cnnjax import checkpoint
  multi, multi_dir = checkpoint.load_variables(runs['multi0']['workdir'])
  single, _ = checkpoint.load_variables(runs['single']['workdir'])
  assert multi_dir.name == str(STEPS)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(multi), jax.tree.leaves(single)):
    error = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert error <= 1e-5, (jax.tree_util.keystr(path), error)


def test_streamed_hosts_read_disjoint_rows_that_cover_the_data_and_train_alike(runs):
  """Each process reads only its half of every global batch from the source (rows disjoint,
  together exactly the batches `train_rows` draws), every test image once over the two, and
  the streamed 2-host run trains exactly like the in-memory 1-host run."""
  from cnnjax.data import batching, load_dataset
  dataset = load_dataset('mnist5k')
  per_epoch = dataset.num_train // 32
  reads = [runs[name]['streamed']['read'] for name in ('multi0', 'multi1')]
  train = [read[str(dataset.num_train)] for read in reads]
  test = [read[str(dataset.num_test)] for read in reads]
  assert not set(train[0]) & set(train[1]) and not set(test[0]) & set(test[1])
  batches = [batching.train_rows(dataset.num_train, 32, per_epoch, 0, step)
             for step in range(STEPS)]
  assert sorted(train[0] + train[1]) == sorted(np.concatenate(batches).tolist())
  for rows, half in zip(train, (slice(0, 16), slice(16, 32))):
    assert sorted(rows) == sorted(np.concatenate([b[half] for b in batches]).tolist())
  assert sorted(test[0] + test[1]) == list(range(dataset.num_test))
  streamed = _metrics(pathlib.Path(f"{runs['multi0']['workdir']}-stream"))
  for m, s in zip(streamed, _metrics(runs['single']['workdir']), strict=True):
    for key in ('loss', 'accuracy'):
      assert abs(m[key] - s[key]) <= 1e-5 * abs(s[key]) + 1e-7, (m, s)


@pytest.mark.parametrize('env, expected', [
    ({}, False),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, False),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False),             # a single-host TPU (Colab)
    ({'TPU_WORKER_HOSTNAMES': 't1k-0,t1k-1,t1k-2,t1k-3'}, True),  # a pod slice
])
def test_clusters_that_start_the_distributed_runtime_themselves(env, expected):
  from cnnjax import parallel
  assert parallel._in_multi_process_cluster(env) is expected


if __name__ == '__main__':
  _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
