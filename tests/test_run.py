"""run.py and the training loop end to end: a short quickstart, resume, and bad input."""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from cnnjax import config as config_lib
from cnnjax import runner

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'run.py', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  """quickstart cut to 150 steps (about 2.4 epochs), evaluated every 62 steps."""
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


def test_rerunning_a_finished_run_resumes_and_reevaluates(quick_run):
  config, workdir, first = quick_run
  again = runner.run(config, workdir)
  assert again['steps'] == 150
  assert again['final_test_accuracy'] == pytest.approx(first['final_test_accuracy'])


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


def test_missing_tfds_data_fails_fast_with_directions(tmp_path):
  start = time.time()
  proc = run_cli('--experiment', 'cifar_resnet', f'--config.data.data_dir={tmp_path}')
  assert time.time() - start < 30        # includes interpreter + JAX start-up; tfds gives up in < 10 s
  assert proc.returncode == 2
  assert str(tmp_path) in proc.stderr and 'tfds build cifar10' in proc.stderr


def test_list_names_every_experiment():
  proc = run_cli('--list')
  assert proc.returncode == 0
  listed = [line.split()[0] for line in proc.stdout.strip().splitlines()]
  assert listed == config_lib.experiment_names()
  assert {'quickstart', 'cifar_resnet', 'cifar_tutorial', 'mnist_lenet'} <= set(listed)
