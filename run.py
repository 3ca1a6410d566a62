"""Train an experiment: `python run.py --experiment cifar_resnet [--config.optimizer.lr=0.05]`.

With no arguments it trains `quickstart` (offline, about a minute on a 2-core CPU).
`--list` lists the experiments. Errors a user can cause print one sentence and exit 2.
"""
from __future__ import annotations

import argparse
import pathlib
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description='Train a cnnjax experiment (experiments/<name>.py).',
      epilog='Override any config field with --config.<key>=<value>, e.g. --config.train.num_epochs=3.')
  parser.add_argument('--experiment', default='quickstart', help='experiment name (default: quickstart)')
  parser.add_argument('--workdir', default=None, help='where outputs go (default: runs/<experiment>)')
  parser.add_argument('--list', action='store_true', help='list the experiments and exit')
  parser.add_argument('--visualize', metavar='LAYER', default=None,
                      help="write PNGs of LAYER's feature maps, the first-layer filters and the "
                           "confusion matrix from the workdir's latest checkpoint, then exit")
  parser.add_argument('--export', metavar='FORMAT', default=None,
                      help="export the workdir's best checkpoint as stablehlo, onnx, tflite or "
                           "onnx-int8 into <workdir>/export/, checked against the JAX model, "
                           "then exit")
  parser.add_argument('--export-layout', default='nhwc', metavar='nhwc|nchw',
                      help='input layout of an ONNX export (default: nhwc, as the JAX model)')
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith('--config.'):
      parser.error(f"unrecognized argument '{item}' (config overrides look like --config.key=value)")
    overrides.append(item)
  return args, overrides


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from cnnjax import runtime
  runtime.configure_cpu()  # XLA:CPU flags, compilation cache, malloc: before JAX starts a backend
  from cnnjax import config as config_lib
  from cnnjax.errors import CnnjaxError
  try:
    from cnnjax import kernels
    kernels.check_environment()  # a typo in CNNJAX_ONEDNN or CNNJAX_BFLOAT16_CONV stops it here
    if args.list:
      for name in config_lib.experiment_names():
        print(f'{name:24s} {config_lib.experiment_summary(name)}')
      return 0
    config = config_lib.load_experiment(args.experiment, overrides)
    workdir = pathlib.Path(args.workdir or pathlib.Path('runs') / config.experiment)
    config_lib.resolve_workdir(config, workdir)
    from cnnjax import runner
    if args.export:
      from cnnjax.export import run_export
      run_export.export_run(config, workdir, args.export, args.export_layout)
    elif args.visualize:
      from cnnjax import inspect_run
      inspect_run.visualize(config, workdir, args.visualize)
    elif config_lib.experiment_main(args.experiment):
      config_lib.experiment_main(args.experiment)(config, workdir)  # a multi-stage experiment
    else:
      runner.run(config, workdir)
  except CnnjaxError as e:  # a user's mistake: one sentence; anything else is a bug (traceback)
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
