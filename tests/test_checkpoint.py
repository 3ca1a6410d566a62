"""Tests for cnnjax.checkpoint: keep/best, fallback, mismatch errors, exact resume after SIGKILL,
SIGTERM saves, restore across device counts (the last three in subprocesses)."""
from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnnjax import checkpoint, parallel, train
from cnnjax.checkpoint import CheckpointError, Checkpoints

REPO = pathlib.Path(__file__).resolve().parent.parent


def ckpt_config(keep=2, best_metric='test_accuracy', every_steps=0):
  return ml_collections.ConfigDict(dict(every_steps=every_steps, keep=keep,
                                        best_metric=best_metric))


def make_state(width=3, bn=True, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {'fc': {'kernel': jax.random.normal(k1, (4, width)), 'bias': jnp.zeros(width)}}
  stats = {}
  if bn:
    params['bn'] = {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}
    stats = {'bn': {'mean': jnp.zeros(4), 'var': jnp.ones(4)}}
  tx = optax.adam(1e-3)
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                          opt_state=tx.init(params), rng=k2, apply_fn=None, tx=tx)


@jax.jit
def fake_step(state):
  """Changes every part of the state, like a train step (and, like it, donation-free here)."""
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=jax.tree.map(lambda s: s + 1, state.batch_stats),
                       opt_state=opt_state, rng=state.rng)


def leaves_of(state):
  return jax.device_get(checkpoint.state_tree(state))


def test_round_trip_keeps_newest_and_best_and_the_typed_key(tmp_path):
  state, states = make_state(), {}
  accuracy = {2: 0.9, 4: 0.3, 6: 0.5}
  with Checkpoints(tmp_path, ckpt_config(keep=2), steps_per_epoch=4) as ckpts:
    for step in range(1, 8):
      state = fake_step(state)
      states[step] = state
      metrics = {'test_accuracy': accuracy[step], 'test_loss': 1.0} if step in accuracy else None
      ckpts.save(step, state, metrics)
    ckpts.save(7, state, force=True)  # the same step again (a preemption right after a save)
  with Checkpoints(tmp_path, ckpt_config(keep=2), steps_per_epoch=4) as ckpts:
    assert ckpts.all_steps() == [2, 6, 7]  # newest 2, plus the best (step 2)
    assert ckpts.best_step() == 2
    restored = ckpts.restore_latest(make_state())
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
  chex.assert_trees_all_equal(leaves_of(restored), leaves_of(states[7]))
  meta = json.loads((tmp_path / '7' / 'meta' / 'metadata').read_text())
  assert (meta['epoch'], meta['step_in_epoch'], meta['steps_per_epoch']) == (1, 3, 4)


def test_best_by_a_loss_is_the_smallest(tmp_path):
  state = make_state()
  with Checkpoints(tmp_path, ckpt_config(keep=1, best_metric='test_loss')) as ckpts:
    for step, loss in [(1, 0.5), (2, 0.2), (3, 0.7), (4, 0.9)]:
      ckpts.save(step, state, {'test_loss': loss})
  with Checkpoints(tmp_path, ckpt_config(keep=1, best_metric='test_loss')) as ckpts:
    assert ckpts.all_steps() == [2, 4]


def test_no_checkpoint_leaves_the_state_unchanged(tmp_path):
  state = make_state()
  with Checkpoints(tmp_path / 'new', ckpt_config()) as ckpts:
    assert ckpts.restore_latest(state) is state


def test_fallback_past_a_corrupted_newest_checkpoint(tmp_path):
  state, states = make_state(), {}
  with Checkpoints(tmp_path, ckpt_config(keep=3, best_metric='')) as ckpts:
    for step in (1, 2, 3):
      state = fake_step(state)
      states[step] = state
      ckpts.save(step, state)
  for f in (tmp_path / '3' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'\0garbage')
  (tmp_path / '2' / 'state' / '_METADATA').unlink()  # 2 is broken too, differently
  with Checkpoints(tmp_path, ckpt_config(keep=3, best_metric='')) as ckpts:
    with pytest.warns(UserWarning) as record:
      restored = ckpts.restore_latest(make_state())
    assert sorted(str(w.message).split(' is unreadable')[0][-1] for w in record) == ['2', '3']
    chex.assert_trees_all_equal(leaves_of(restored), leaves_of(states[1]))
    # The broken ones are set aside, not deleted; the valid one is untouched, and steps 2 and 3
    # can be written again by the resumed run.
    assert sorted(p.name.split('-')[0] for p in (tmp_path / 'corrupt').iterdir()) == ['2', '3']
    assert ckpts.all_steps() == [1]
    ckpts.save(2, fake_step(restored))
    ckpts.save(3, fake_step(fake_step(restored)))
  with Checkpoints(tmp_path, ckpt_config(keep=3, best_metric='')) as ckpts:
    assert ckpts.all_steps() == [1, 2, 3]
    chex.assert_trees_all_equal(leaves_of(ckpts.restore_latest(make_state())),
                                leaves_of(states[3]))


def test_all_checkpoints_unreadable_is_an_error(tmp_path):
  with Checkpoints(tmp_path, ckpt_config(best_metric='')) as ckpts:
    ckpts.save(1, make_state())
  (tmp_path / '1' / 'meta' / 'metadata').write_text('{not json')
  with Checkpoints(tmp_path, ckpt_config(best_metric='')) as ckpts:
    with pytest.raises(CheckpointError, match=f'no checkpoint in {tmp_path} is readable'):
      ckpts.restore_latest(make_state())


def test_another_architecture_names_the_mismatched_paths(tmp_path):
  with Checkpoints(tmp_path, ckpt_config()) as ckpts:
    ckpts.save(5, make_state(width=3).replace(step=jnp.int32(5)))
    with pytest.raises(CheckpointError) as error:
      ckpts.restore_latest(make_state(width=5, bn=False))
  message = str(error.value)
  assert f'checkpoint {tmp_path / "5"} is of another architecture' in message
  assert 'params/fc/kernel (4, 3) vs (4, 5)' in message
  assert 'unexpected batch_stats/bn/mean' in message
  assert '\n' not in message


def test_another_optimizer_and_another_data_position_are_errors(tmp_path):
  with Checkpoints(tmp_path, ckpt_config(), steps_per_epoch=10) as ckpts:
    ckpts.save(5, make_state().replace(step=jnp.int32(5)))
  sgd_state = make_state()
  sgd_state = sgd_state.replace(opt_state=optax.sgd(0.1, momentum=0.9).init(sgd_state.params))
  with pytest.raises(CheckpointError, match='another optimizer configuration'):
    Checkpoints(tmp_path, ckpt_config()).restore_latest(sgd_state)
  with pytest.raises(CheckpointError, match='10 steps per epoch but this run has 12'):
    Checkpoints(tmp_path, ckpt_config(), steps_per_epoch=12).restore_latest(make_state())


def test_bad_directories_and_metrics(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(CheckpointError, match='is a file, not a directory'):
    Checkpoints(tmp_path / 'file', ckpt_config())
  with pytest.raises(CheckpointError, match='does not exist'):
    checkpoint.load_variables(tmp_path / 'missing')
  with pytest.raises(CheckpointError, match='holds no cnnjax checkpoint'):
    checkpoint.load_variables(tmp_path)
  with Checkpoints(tmp_path / 'c', ckpt_config(best_metric='val_top1')) as ckpts:
    with pytest.raises(CheckpointError, match="best_metric 'val_top1' is not among"):
      ckpts.save(1, make_state(), {'test_accuracy': 0.5})


def test_non_finite_parameters_are_never_saved(tmp_path):
  state = make_state()
  bad = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
  with Checkpoints(tmp_path, ckpt_config()) as ckpts:
    ckpts.save(1, state)
    with pytest.warns(UserWarning, match='not finite'):
      ckpts.save(2, bad)
    assert ckpts.all_steps() == [1]


def test_async_save_survives_donation_of_the_state(tmp_path):
  """The loop donates the state to the next step right after `save` returns."""
  step = jax.jit(fake_step.__wrapped__, donate_argnums=0)
  state = step(make_state())
  expected = leaves_of(state)
  with Checkpoints(tmp_path, ckpt_config(best_metric='')) as ckpts:
    ckpts.save(1, state)
    for _ in range(3):
      state = step(state)
  chex.assert_trees_all_equal(jax.device_get(checkpoint.load_variables(tmp_path)[0]),
                              {'params': expected['params'], 'batch_stats': expected['batch_stats']})


# ---------------------------------------------------------------------------------------------
# Real training runs in subprocesses: SIGKILL / SIGTERM / resume, and 8 <-> 1 devices.

# The runs use the suite's compilation cache (tests/conftest.py puts it in the environment).
_RUN = """
import json, sys
from cnnjax import config as config_lib, runner
config = config_lib.base_config()
config.model.kwargs.widths = (4, 8, 8)
config.model.kwargs.hidden = 16
config_lib.apply_overrides(config, json.loads(sys.argv[2]))
runner.run(config, sys.argv[1])
"""
STEPS, EVERY = 30, 3
OVERRIDES = ['model.name=convnet', 'data.name=mnist5k', 'data.classes=(0,1)', 'data.crop_padding=2',
             'train.batch_size=32', f'train.num_steps={STEPS}', f'checkpoint.every_steps={EVERY}',
             'checkpoint.keep=2', 'train.progress_bar=false', 'train.log_every_steps=5',
             'optimizer.name=adam', 'optimizer.lr=0.003']  # 25 steps per epoch: crosses an epoch


def _env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  env.pop('XLA_FLAGS', None)
  if devices > 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _start(workdir):
  return subprocess.Popen([sys.executable, '-c', _RUN, str(workdir), json.dumps(OVERRIDES)],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def _interrupt_after_checkpoint(proc, workdir, step, sig, delay=0.0):
  """Sends `sig` `delay` seconds after a checkpoint of at least `step` is committed."""
  directory = workdir / 'checkpoints'
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if directory.is_dir() and any(p.name.isdigit() and int(p.name) >= step
                                  for p in directory.iterdir()):
      time.sleep(delay)
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def _final_variables(workdir):
  variables, step_dir = checkpoint.load_variables(workdir / 'checkpoints' / str(STEPS))
  assert step_dir.name == str(STEPS)
  return variables


@pytest.mark.slow
def test_exact_resume_after_sigkill_and_clean_exit_on_sigterm(tmp_path):
  reference = tmp_path / 'uninterrupted'
  _finish(_start(reference))
  expected = _final_variables(reference)

  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  kill_at, delay = rng.randrange(EVERY, 18, EVERY), rng.uniform(0, 0.5)  # mid-step or mid-save
  workdir = tmp_path / 'interrupted'
  code, out = _interrupt_after_checkpoint(_start(workdir), workdir, kill_at, signal.SIGKILL,
                                          delay)
  assert code == -signal.SIGKILL, f'the run ended before it was killed (seed {seed}):\n{out[-2000:]}'

  # Resume; SIGTERM it once it has written a checkpoint newer than any the killed run left
  # (within the kill delay that run may have saved several more): it must save where it stopped
  # and exit cleanly.
  left = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  term_at = rng.randrange(max(kill_at, left) + EVERY, 28, EVERY) if left + EVERY < 28 else None
  if term_at is not None:
    code, out = _interrupt_after_checkpoint(_start(workdir), workdir, term_at,
                                            signal.SIGTERM)
    assert code == 0, out[-3000:]
    assert 'resumed from step' in out
    if 'preempted at step ' in out:
      stopped = int(out.split('preempted at step ')[1].split(';')[0])
      assert (workdir / 'checkpoints' / str(stopped) / 'state').is_dir(), out[-2000:]
      out = _finish(_start(workdir))
      assert f'resumed from step {stopped}' in out
    else:  # the asynchronous save landed after the last step: the run had finished cleanly
      assert f'finished step {STEPS}' in out, out[-2000:]
  else:  # the killed run got to the last checkpoints: only the exact resume is left to check
    out = _finish(_start(workdir))
    assert 'resumed from step' in out
  chex.assert_trees_all_equal(_final_variables(workdir), expected,
                              custom_message=f'kill at {kill_at}+{delay:.2f}s, term at {term_at}, seed {seed}')


_DEVICES = """
import sys
sys.path.insert(0, sys.argv[2])
import jax
from tests.test_checkpoint import save_replicated, restore_and_check
assert jax.device_count() == 8, jax.devices()
restore_and_check(sys.argv[1] + '/from1')
save_replicated(sys.argv[1] + '/from8')
print('ok')
"""


def save_replicated(directory):
  mesh = parallel.data_mesh()
  state = parallel.replicate(fake_step(fake_step(make_state())), mesh)
  assert len(state.params['fc']['kernel'].sharding.device_set) == jax.device_count()
  with Checkpoints(directory, ckpt_config(best_metric='')) as ckpts:
    ckpts.save(int(state.step), state)


def restore_and_check(directory):
  with Checkpoints(directory, ckpt_config(best_metric='')) as ckpts:
    state = ckpts.restore_latest(make_state())
  chex.assert_trees_all_equal(leaves_of(state), leaves_of(fake_step(fake_step(make_state()))))
  replicated = parallel.replicate(state, parallel.data_mesh())
  assert len(replicated.params['fc']['kernel'].sharding.device_set) == jax.device_count()


def test_restore_across_device_counts(tmp_path):
  if jax.device_count() != 1:
    pytest.skip('this half runs in the one-device test process')
  save_replicated(tmp_path / 'from1')
  result = subprocess.run([sys.executable, '-c', _DEVICES, str(tmp_path), str(REPO)], cwd=REPO,
                          env=_env(8), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stdout + result.stderr[-3000:]
  restore_and_check(tmp_path / 'from8')
