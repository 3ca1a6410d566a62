"""run.py and the training loop end to end: a short quickstart, resume and its summary,
preemption, and bad input."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cnnjax import config as config_lib
from cnnjax import runner

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=120, **env_vars):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **env_vars)
  return subprocess.run([sys.executable, 'run.py', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  """quickstart cut to 150 steps (about 2.4 epochs), evaluated every 75 steps."""
  workdir = tmp_path_factory.mktemp('quickstart')
  config = config_lib.load_experiment('quickstart', [
      'train.num_steps=150', 'train.progress_bar=false', 'train.eval_every_steps=75'])
  result = runner.run(config, workdir)
  return config, workdir, result


def test_quickstart_learns_and_writes_its_outputs(quick_run):
  _, workdir, result = quick_run
  assert result['final_test_accuracy'] > 0.8      # chance is 0.1
  assert result['steps'] == 150
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  test_rows = [r for r in rows if r['split'] == 'test']
  assert [r['step'] for r in test_rows] == [75, 150]
  assert all(r['count'] == 1000 for r in test_rows)  # every held-out digit, exactly once
  train_rows = [r for r in rows if r['split'] == 'train']
  assert train_rows[-1]['loss'] < train_rows[0]['loss']
  assert {'loss', 'accuracy', 'top5_accuracy', 'lr', 'grad_norm'} <= set(train_rows[0])
  png = (workdir / 'curves.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert result['train_images_per_second'] > 0


def _test_rows(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r for r in rows if r['split'] == 'test']


def test_rerunning_a_finished_run_resumes_and_reevaluates(quick_run, capsys):
  config, workdir, first = quick_run
  capsys.readouterr()
  recorded = _test_rows(workdir)
  again = runner.run(config, workdir)
  assert again['steps'] == 150 and not again['preempted']
  assert again['final_test_accuracy'] == pytest.approx(first['final_test_accuracy'])
  # The best is every evaluation's, not only this run's one (ties: the newest, as orbax keeps).
  best = max(recorded, key=lambda r: (r['accuracy'], r['step']))
  assert (again['best_step'], again['best_test_accuracy']) == (best['step'], best['accuracy'])
  assert (first['best_step'], first['best_test_accuracy']) == (best['step'], best['accuracy'])
  assert again['train_steps'] == 0 and again['train_images_per_second'] is None
  assert _test_rows(workdir) == recorded  # a re-evaluation is not recorded again
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith(f'quickstart: finished step 150; test accuracy final '
                         f'{again["final_test_accuracy"]:.2%}, best {best["accuracy"]:.2%} '
                         f'(step {best["step"]}); '), line
  assert line.endswith(f' s wall, no training steps run; outputs in {workdir}'), line
  assert 'nan' not in line


def test_the_best_comes_from_the_checkpoints_and_a_skipped_evaluation_is_made_up(
    quick_run, tmp_path, capsys):
  """The metrics stored with each checkpoint decide the best, by checkpoint.best_metric (a loss
  is minimized); a checkpoint a preemption saved at an evaluation step has none, and the
  resumed run evaluates that step first and records it."""
  config, workdir, _ = quick_run
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  metrics = copy / 'checkpoints' / '75' / 'metrics' / 'metrics'
  stored = json.loads(metrics.read_text())
  metrics.write_text(json.dumps({**stored, 'test_loss': 0.001, 'test_accuracy': 0.001}))
  shutil.rmtree(copy / 'checkpoints' / '150' / 'metrics')  # as a preemption save leaves it
  config = config_lib.load_experiment('quickstart', [
      'train.num_steps=150', 'train.progress_bar=false', 'train.eval_every_steps=75',
      'checkpoint.best_metric=test_loss'])
  capsys.readouterr()
  result = runner.run(config, copy)
  assert (result['best_metric'], result['best_step'], result['best_value']) == ('test_loss', 75,
                                                                                0.001)
  assert [r['step'] for r in _test_rows(copy)] == [75, 150, 150]  # 150 evaluated and recorded
  assert result['final_test_accuracy'] == _test_rows(copy)[-1]['accuracy']
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert ', best test_loss 0.0010 (step 75); ' in line, line


# A tiny convnet on two digits through run.py: 25 steps per epoch, a checkpoint every 3 steps.
TINY = ['--config.model.name=convnet', '--config.model.kwargs.widths=(4,8,8)',
        '--config.model.kwargs.hidden=16', '--config.data.classes=(0,1)',
        '--config.train.batch_size=32', '--config.train.num_steps=30',
        '--config.checkpoint.every_steps=3', '--config.checkpoint.keep=2',
        '--config.train.log_every_steps=5', '--config.train.progress_bar=false']


def test_sigterm_before_the_first_evaluation_saves_and_exits_without_evaluating(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.Popen([sys.executable, 'run.py', '--workdir', str(tmp_path), *TINY],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if any(p.name.isdigit() for p in (tmp_path / 'checkpoints').glob('*')):
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stopped = int(out.split('preempted at step ')[1].split(';')[0])
  assert stopped < 25, out[-2000:]  # before the first evaluation (the end of epoch 1)
  assert f'preempted at step {stopped}; not evaluated yet; ' in out, out[-2000:]
  assert 'test loss' not in out and not _test_rows(tmp_path)  # no evaluation was run
  assert (tmp_path / 'checkpoints' / str(stopped) / 'state').is_dir()


def test_nan_loss_stops_with_a_clear_error(tmp_path):
  config = config_lib.load_experiment('quickstart', [
      'model.name=lenet5', 'optimizer.name=sgd', 'optimizer.lr=inf', 'schedule.name=constant',
      'train.num_steps=8', 'train.log_every_steps=4', 'train.progress_bar=false'])
  with pytest.raises(runner.TrainingError, match='loss became'):
    runner.run(config, tmp_path)


@pytest.mark.parametrize('args, message', [
    (['--experiment', 'no_such_thing'], "unknown experiment 'no_such_thing'; choose one of: "),
    (['--config.optimizer.lrr=0.1'], "unknown config key 'optimizer.lrr'"),
    (['--config.train.batch_size=big'], "config key 'train.batch_size' expects an int"),
    (['--config.data.name=imagenet_ultra'], "unknown dataset 'imagenet_ultra'"),
    (['--config.train.batch_size=-3'], 'batch_size'),
])
def test_bad_cli_input_prints_one_line_and_exits_2(args, message):
  proc = run_cli(*args)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert message.lower() in lines[0].lower()


@pytest.mark.parametrize('switch', ['CNNJAX_ONEDNN', 'CNNJAX_BFLOAT16_CONV'])
def test_a_kernel_switch_that_is_no_setting_prints_one_line_and_exits_2(tmp_path, switch):
  """A typo in the environment stops the run (on any CPU) instead of running the default way,
  before it starts: the workdir stays empty."""
  workdir = tmp_path / 'run'
  proc = run_cli('--config.model.dtype=bfloat16', f'--workdir={workdir}',
                 **{switch: 'onn'})
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines == [lines[0]] and lines[0].startswith(f"error: {switch}='onn' is not a setting"), (
      proc.stderr)
  assert not workdir.exists() or not any(workdir.iterdir()), sorted(workdir.iterdir())


def test_missing_tfds_data_fails_fast_with_directions(tmp_path):
  start = time.time()
  proc = run_cli('--experiment', 'cifar_resnet', f'--config.data.data_dir={tmp_path}')
  assert time.time() - start < 30        # includes interpreter + JAX start-up; tfds gives up in < 10 s
  assert proc.returncode == 2
  assert str(tmp_path) in proc.stderr and "tfds.builder('cifar10'" in proc.stderr


def test_list_names_every_experiment():
  proc = run_cli('--list')
  assert proc.returncode == 0
  listed = [line.split()[0] for line in proc.stdout.strip().splitlines()]
  assert listed == config_lib.experiment_names()
  assert {'quickstart', 'cifar_resnet', 'cifar_tutorial', 'mnist_lenet'} <= set(listed)
