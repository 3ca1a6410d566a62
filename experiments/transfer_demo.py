"""Transfer learning offline: pretrain on mnist5k digits 0-4, fine-tune on 5-9; beats from-scratch.

Command:  python run.py --experiment transfer_demo [--workdir runs/transfer_demo]
          (or python experiments/transfer_demo.py; from Python: `main(get_config(), workdir)`).
          It runs four trainings:
          1. `get_pretrain_config()`: convnet on digits 0-4 (2,000 images), 8 epochs -> <workdir>/pretrain;
          2. `get_config()`: digits 5-9 (relabelled 0-4), initialized from step 1's checkpoint
             (`transfer.init_from`) except the head fc2 (`transfer.exclude`) -> <workdir>/transfer;
          3. the same, training only the new head (`optimizer.trainable=('fc2',)`) -> <workdir>/head_only;
          4. the same run from scratch (`transfer.init_from=''`) -> <workdir>/scratch;
          and prints the test accuracy of 2-4 at every evaluation (equal steps).
          Each stage resumes if interrupted.
Expected: transfer ahead of scratch at every evaluation. Measured (seed 0, 2 busy CPU cores, 2 min
          in all): pretraining 98.4% on digits 0-4 (248 steps); after the 32 fine-tuning
          steps on digits 5-9: transfer 90.0%, head only 53.8%, scratch 38.0% (scratch's
          training-batch accuracy is ~70%: its BatchNorm running statistics lag its fast-moving
          weights). With 64 steps scratch nearly catches up (94.8% transfer vs 93.6% scratch).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

if __name__ == '__main__':  # run as a script from a checkout: make `cnnjax` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from cnnjax.config import base_config  # noqa: E402

DEFAULT_WORKDIR = 'runs/transfer_demo'
VARIANTS = ('transfer', 'head_only', 'scratch')  # all layers / only the new head / no pretraining


def _common():
  config = base_config()
  config.model.name = 'convnet'
  config.data.name = 'mnist5k'
  config.data.crop_padding = 2
  config.optimizer.name = 'adam'
  config.optimizer.lr = 2e-3
  config.schedule.name = 'cosine'
  config.train.batch_size = 64
  config.train.log_every_steps = 8
  config.train.progress_bar = False
  return config


def get_pretrain_config():
  """Stage 1: the source task, digits 0-4."""
  config = _common()
  config.data.classes = (0, 1, 2, 3, 4)
  config.train.num_epochs = 8
  return config


def get_config():
  """Stage 2: the target task, digits 5-9, from stage 1's weights (a new head)."""
  config = _common()
  config.data.classes = (5, 6, 7, 8, 9)
  config.train.num_steps = 32            # one epoch of the 2,000 training digits
  config.train.eval_every_steps = 4
  config.transfer.init_from = f'{DEFAULT_WORKDIR}/pretrain'
  config.transfer.exclude = ('fc2',)     # the classifier: new classes, freshly initialized
  return config


def main(config=None, workdir: str | pathlib.Path = DEFAULT_WORKDIR) -> dict:
  """Runs the stages in `workdir`; returns {variant: {step: test accuracy}}."""
  from cnnjax import recorder, runner  # heavy imports only when running

  workdir = pathlib.Path(workdir)
  config = get_config() if config is None else config
  pretrain = get_pretrain_config()
  pretrain.seed = config.seed
  pretrain.parallel.update(config.parallel.to_dict())  # every stage on the same devices and hosts
  runner.run(pretrain, workdir / 'pretrain')

  runs = {}
  for name in VARIANTS:
    stage = config.copy_and_resolve_references()
    stage.transfer.init_from = str(workdir / 'pretrain') if name != 'scratch' else ''
    stage.transfer.exclude = config.transfer.exclude if name != 'scratch' else ()
    if name == 'head_only':
      stage.optimizer.trainable = stage.transfer.exclude  # train the new head, freeze the rest
    runner.run(stage, workdir / name)
    runs[name] = {r['step']: r['accuracy'] for r in recorder.read_metrics(workdir / name)
                  if r['split'] == 'test'}

  print(f'\ndigits 5-9 test accuracy at equal steps '
        f'(fine-tuning from digits 0-4 vs from scratch):')
  print(f'{"step":>6}' + ''.join(f'{name:>11}' for name in VARIANTS))
  for step in sorted(runs['scratch']):
    print(f'{step:>6}' + ''.join(f'{runs[n].get(step, float("nan")):>11.2%}' for n in VARIANTS))
  return runs


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default=DEFAULT_WORKDIR)
  main(workdir=parser.parse_args().workdir)
