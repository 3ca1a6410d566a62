"""Every experiment file starts with its defaults on 8 devices, in both parallel modes.

Each experiment in experiments/ runs through run.py's `main` with its own batch sizes, model and
recipe on 8 simulated CPU devices, and `quickstart` (the default) on 1, 2 and 4 devices too. Only
the data is swapped: `load_dataset` returns a random stand-in of the same shape and classes
(CIFAR-10: 32x32x3, MNIST and mnist5k: 28x28x1, 10 classes) whose test split of 100 images
divides over no device count here, so evaluation pads and masks; data an experiment makes
itself offline (folder_digits' JPEG folder) is read as it is. A run trains STEPS steps, then
evaluates and checkpoints; its learning-rate schedule still spans the experiment's whole length
(onecycle and warmups cannot be squeezed into one step). A multi-stage experiment (one with a `main`, e.g.
transfer_demo) runs every stage. cifar_transfer_resnet's ImageNet weights are a stand-in too: a
freshly initialized torchvision ResNet-18 saved where the experiment looks for the real file.

All runs share one child process (this file run as a script) with 8 simulated devices, so each
program compiles once (and the persistent compilation cache serves later runs); a run on fewer
devices gets the first N of them (`DataParallel.create(mode, devices)`), as on a smaller host.

Budget (2 CPU cores): the four heaviest experiments that run here train in one mode each,
alternating (the modes' code is model-agnostic and every light experiment runs both);
cifar_vgg16 and the ImageNet experiments are only checked for their default batches (NOT_RUN
says why). CNNJAX_TEST_FULL_MATRIX=1 runs cifar_vgg16 too, and everything in both modes.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import time
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = ('jit', 'pmap')
STEPS = 1
TRAIN_EXAMPLES = 1024   # one step of cifar_speedrun's batch of 1024
TEST_EXAMPLES = 100     # a multiple of neither 8, 4 nor 3: the last eval batch is padded
NUM_CLASSES = 10
SHAPES = {'cifar10': (32, 32, 3), 'mnist': (28, 28, 1), 'mnist5k': (28, 28, 1)}
FULL = os.environ.get('CNNJAX_TEST_FULL_MATRIX', '') == '1'
ONE_MODE = {} if FULL else {'cifar_resnet': 'jit', 'cifar_resnet18': 'pmap',
                            'cifar_transfer_resnet': 'jit', 'cifar_speedrun': 'pmap'}
# Not run, only checked for their default batches (test_every_default_train_batch_divides_...):
NOT_RUN = {
    **{name: 'one step at 224x224 with batch 1024 is trillions of multiply-adds and tens of GB '
             'of activations: not a 2-core CPU test' for name in (
                 'imagenet_resnet18', 'imagenet_resnet50', 'imagenet_resnet50_lamb',
                 'imagenet_convnext_tiny', 'imagenet_resnet50_torchvision')},
    **({} if FULL else {'cifar_vgg16': '8 replicas of its 134M-parameter train state need about '
                        '13 GB of host memory (a TPU core holds one), and even on 2 devices one '
                        'step and its 1 GB checkpoint would take most of this file\'s budget; '
                        'CNNJAX_TEST_FULL_MATRIX=1 runs it'}),
}


def _experiments() -> list[str]:
  return sorted(p.stem for p in (ROOT / 'experiments').glob('*.py') if not p.stem.startswith('_'))


def _plan() -> list[tuple[str, str, int]]:
  """(experiment, mode, devices) of every run."""
  runs = [(name, mode, 8) for name in _experiments() if name not in NOT_RUN
          for mode in MODES if ONE_MODE.get(name, mode) == mode]
  return runs + [('quickstart', mode, n) for n in (1, 2, 4) for mode in MODES]


# ---------------------------------------------------------------------------------------------
# The child: runs experiments on this process's devices and reports what each run recorded.


@functools.lru_cache(maxsize=None)
def _stand_in(name: str, data_dir=None):
  """Random uint8 images of the dataset's shape, labels 0-9 in turn (every class present)."""
  import numpy as np
  from cnnjax.data import Dataset
  rng = np.random.default_rng(0)
  n = TRAIN_EXAMPLES + TEST_EXAMPLES
  images = rng.integers(0, 256, (n, *SHAPES[name]), dtype=np.uint8)
  labels = np.arange(n) % NUM_CLASSES
  return Dataset.from_arrays(f'{name} (stand-in)', images[:TRAIN_EXAMPLES],
                             labels[:TRAIN_EXAMPLES], images[TRAIN_EXAMPLES:],
                             labels[TRAIN_EXAMPLES:], num_classes=NUM_CLASSES)


def _stand_in_imagenet_weights(hub_dir: pathlib.Path) -> bool:
  """torchvision's resnet18 file name, with freshly initialized weights; False without torch."""
  try:
    import torch
    import torchvision
  except ImportError:
    return False
  from cnnjax import torchvision_weights
  hub_dir.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(0)
  torch.save(torchvision.models.resnet18().state_dict(),
             hub_dir / torchvision_weights.IMAGENET_FILES['resnet18'])
  torchvision_weights.TORCH_HUB_DIR = str(hub_dir)  # where the experiment's config looks
  return True


def _child(plan: list[tuple[str, str, int]], root: pathlib.Path) -> dict:
  from cnnjax import runtime
  runtime.configure_cpu()  # as run.py does, before JAX starts: CPU flags, the compilation cache
  needs_torch = any(name == 'cifar_transfer_resnet' for name, _, _ in plan)
  torch_ok = needs_torch and _stand_in_imagenet_weights(root / 'torch_hub')
  import jax
  sys.path.insert(0, str(ROOT))
  import run as cli
  from cnnjax import data, optim, parallel, recorder, runner

  assert jax.device_count() == 8, jax.devices()
  real_load_dataset, real_load_data = data.load_dataset, runner.load_data

  def load_dataset(name, data_dir=None):  # a stand-in for what cannot be had offline
    return _stand_in(name) if name in SHAPES else real_load_dataset(name, data_dir)

  def load_data(config):  # what the run evaluates on (after any class selection)
    dataset = real_load_data(config)
    stages[-1]['test_examples'] = dataset.num_test
    return dataset

  data.load_dataset, runner.load_data = load_dataset, load_data
  real_run, real_make_optimizer, stages = runner.run, optim.make_optimizer, []
  real_create = parallel.DataParallel.create.__func__
  current = {}

  def run_stage(config, workdir):  # every stage of an experiment, also inside its own main()
    current.update(steps=config.train.num_steps, epochs=config.train.num_epochs)
    config.train.num_steps = STEPS
    config.train.progress_bar = False
    stages.append({'workdir': str(workdir), 'batch_size': config.train.batch_size,
                   'mode': config.parallel.mode})
    return real_run(config, workdir)

  def make_optimizer(opt_cfg, sched_cfg, steps_per_epoch, total_steps, *args, **kwargs):
    total = current['steps'] or steps_per_epoch * current['epochs']  # the whole run's schedule
    return real_make_optimizer(opt_cfg, sched_cfg, steps_per_epoch, total, *args, **kwargs)

  def create(cls, mode='jit', devices=None):
    strategy = real_create(cls, mode, jax.devices()[:current['devices']] if devices is None
                           else devices)
    stages[-1]['devices'] = strategy.num_devices
    return strategy

  runner.run, optim.make_optimizer = run_stage, make_optimizer
  parallel.DataParallel.create = classmethod(create)
  report = {'torch': torch_ok, 'runs': {}}
  for name, mode, devices in plan:
    if name == 'cifar_transfer_resnet' and not torch_ok:
      continue
    stages.clear()
    current['devices'] = devices
    start, cpu, error = time.time(), time.process_time(), ''
    try:
      code = cli.main(['--experiment', name, '--workdir', str(root / f'{name}-{mode}-{devices}'),
                       f'--config.parallel.mode={mode}'])
    except Exception:  # pylint: disable=broad-except  (reported by the test, with traceback)
      code, error = -1, traceback.format_exc()
    runs = []
    for stage in stages:
      rows = recorder.read_metrics(stage['workdir'])
      checkpoints = pathlib.Path(stage['workdir']) / 'checkpoints'
      runs.append({**stage,
                   'train_losses': [r['loss'] for r in rows if r['split'] == 'train'],
                   'test_counts': [r['count'] for r in rows if r['split'] == 'test'],
                   'test_losses': [r['loss'] for r in rows if r['split'] == 'test'],
                   'steps': max([r['step'] for r in rows], default=0),
                   'checkpoints': sorted(p.name for p in checkpoints.glob('*') if p.name.isdigit())})
    report['runs'][f'{name}-{mode}-{devices}'] = {
        'code': code, 'error': error, 'stages': runs,
        'seconds': time.time() - start, 'cpu_seconds': time.process_time() - cpu}
  return report


# ---------------------------------------------------------------------------------------------
# The tests.


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  root = tmp_path_factory.mktemp('experiments')
  flags = os.environ.get('XLA_FLAGS', '')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT),
             XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count=8'.strip())
  out = root / 'report.json'
  runs = [f'{name}:{mode}:{devices}' for name, mode, devices in _plan()]
  proc = subprocess.run([sys.executable, __file__, str(root), str(out), *runs], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=3000)
  assert proc.returncode == 0 and out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
  result = json.loads(out.read_text())
  result['stderr'] = proc.stderr
  return result


@pytest.mark.parametrize('name, mode, devices', _plan(),
                         ids=[f'{n}-{m}-{d}' for n, m, d in _plan()])
def test_every_experiment_starts_with_its_defaults(report, name, mode, devices):
  if name == 'cifar_transfer_resnet' and not report['torch']:
    pytest.skip('writing the stand-in torchvision weights (.pth) needs torch')
  run = report['runs'][f'{name}-{mode}-{devices}']
  assert run['code'] == 0, run['error'] or report['stderr'][-3000:]
  assert run['stages'], 'the experiment trained nothing'
  for stage in run['stages']:
    assert (stage['mode'], stage['devices']) == (mode, devices), stage
    assert stage['steps'] == STEPS and stage['checkpoints'] == [str(STEPS)], stage
    assert stage['train_losses'] and all(map(math.isfinite, stage['train_losses'])), stage
    assert stage['test_counts'] == [stage['test_examples']], stage  # each test image once


@pytest.mark.parametrize('name', [n for n in _experiments() if n in NOT_RUN])
def test_experiments_too_big_to_run_here(name):
  pytest.skip(f'{name}: {NOT_RUN[name]}')


def test_quickstart_computes_the_same_on_every_device_count_and_mode(report):
  """The first step's loss and the test loss after it, on 1, 2, 4 and 8 devices, jit and pmap."""
  runs = {key: run['stages'][0] for key, run in report['runs'].items()
          if key.startswith('quickstart-') and run['code'] == 0}
  assert len(runs) == 2 * 4, sorted(runs)
  reference = runs['quickstart-jit-1']
  for key, stage in runs.items():
    assert stage['train_losses'] == pytest.approx(reference['train_losses'], rel=1e-5), key
    assert stage['test_losses'] == pytest.approx(reference['test_losses'], rel=1e-4), key


def test_every_default_train_batch_divides_over_1_2_4_and_8_devices():
  """Also for the stages of multi-stage experiments (their other get_*config functions)."""
  import importlib.util
  for name in _experiments():
    spec = importlib.util.spec_from_file_location(name, ROOT / 'experiments' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getters = [getattr(module, f) for f in dir(module)
               if f.startswith('get_') and f.endswith('config') and callable(getattr(module, f))]
    for get_config in getters:
      train = get_config().train  # and each device's rows split into the micro-batches
      batch, k = train.batch_size, train.accumulate_steps
      assert all(batch % (n * k) == 0 for n in (1, 2, 4, 8)), (name, get_config.__name__, batch)


def _exit_with_the_test(parent: int) -> None:
  """Ends this child when the pytest process that started it is gone (killed, timed out):
  it must not go on training for its whole plan with no one to report to."""
  import threading

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(3)

  threading.Thread(target=watch, daemon=True).start()


if __name__ == '__main__':
  _exit_with_the_test(os.getppid())
  workroot, report_path, *cases = sys.argv[1:]
  plan = [(name, mode, int(devices)) for name, mode, devices in (c.split(':') for c in cases)]
  pathlib.Path(report_path).write_text(json.dumps(_child(plan, pathlib.Path(workroot))))
