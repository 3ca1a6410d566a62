"""`python run.py --experiment X --export FORMAT`: export a trained run's best checkpoint.

Reads the best checkpoint of `<workdir>/checkpoints/` by `checkpoint.best_metric` (the newest
when no checkpoint has metrics), rebuilds the model from the experiment config (in float32),
and writes `<workdir>/export/<model><suffix>` plus `<model><suffix>.json` (cnnjax/export/
metadata.py). Every export is checked on the run's own test split against the JAX model, read
batch by batch as evaluation reads it (in memory, or streamed from files and center-cropped to
`data.image_size`, the input size the exported model then takes); int8 reports its test
accuracy next to float32's, calibrated on training images (cnnjax/export/quantize.py).
Reads the workdir only (no lock), so it can run beside a training run of the same workdir.
"""
from __future__ import annotations

import functools
import json
import pathlib
import time

import ml_collections

from cnnjax import checkpoint
from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.export import metadata

# format -> file suffix
FORMATS = {'stablehlo': '.stablehlo', 'onnx': '.onnx', 'tflite': '.tflite',
           'onnx-int8': '.int8.onnx'}


def best_step_dir(workdir: pathlib.Path, metric: str) -> pathlib.Path:
  """The step directory with the best `metric` among those saved with metrics, else the newest."""
  steps = sorted((int(p.name) for p in (workdir / 'checkpoints').glob('*')
                  if p.name.isdigit() and (p / 'state').is_dir()), reverse=True)
  if not steps:
    raise CheckpointError(f'{workdir} holds no checkpoint to export; train first with python '
                          f'run.py --experiment <name> --workdir {workdir}.')
  scored = []
  for step in steps:
    metrics_file = workdir / 'checkpoints' / str(step) / 'metrics' / 'metrics'
    if metric and metrics_file.is_file():
      value = json.loads(metrics_file.read_text()).get(metric)
      if value is not None:
        scored.append((float(value), step))
  if not scored:
    return workdir / 'checkpoints' / str(steps[0])
  sign = -1.0 if checkpoint.minimizes(metric) else 1.0
  best = max(scored, key=lambda item: (sign * item[0], item[1]))  # ties: the newer step
  return workdir / 'checkpoints' / str(best[1])


def load_best(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """(model, variables, dataset, step directory) of the run's best checkpoint, in float32."""
  from cnnjax import runner  # late: runner pulls in the whole training stack
  step_dir = best_step_dir(workdir, str(config.checkpoint.best_metric))
  variables, step_dir = checkpoint.load_variables(step_dir)
  float_config = ml_collections.ConfigDict(config.to_dict())
  float_config.model.dtype = 'float32'
  dataset = runner.load_data(float_config)
  model = runner.build_model(float_config, dataset)
  checkpoint.check_fits(variables, model, dataset.image_shape, step_dir, config.model.name)
  return model, variables, dataset, step_dir


def export_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, fmt: str,
               layout: str = 'nhwc') -> dict:
  """Exports the best checkpoint of `workdir` as `fmt` (FORMATS), checked; returns the metadata
  it wrote beside the model."""
  from cnnjax import export  # the package's API (this module is part of it)
  fmt = fmt.lower()
  if fmt not in FORMATS:
    raise ConfigError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}.")
  layout = layout.lower()
  if layout not in ('nhwc', 'nchw') or (layout == 'nchw' and 'onnx' not in fmt):
    raise ConfigError(f"--export-layout {layout} is not offered for {fmt}: ONNX takes nhwc "
                      f"(default) or nchw, StableHLO and TFLite take nhwc.")
  workdir = pathlib.Path(workdir)
  started = time.perf_counter()
  model, variables, dataset, step_dir = load_best(config, workdir)
  name = config.model.name
  path = workdir / 'export' / f'{name}{FORMATS[fmt]}'
  extra = {}
  if fmt == 'onnx-int8':
    extra['int8'] = export.quantize_int8(model, variables, path, dataset, layout=layout)
    check = None
  else:
    save = {'stablehlo': export.to_stablehlo, 'onnx': functools.partial(export.to_onnx,
                                                                        layout=layout),
            'tflite': export.to_tflite}[fmt]
    check = save(model, variables, path, dataset).as_dict()
  meta = metadata.describe(
      fmt=fmt, file=path.name, model_name=name, input_shape=dataset.image_shape, layout=layout,
      num_classes=dataset.num_classes, mean=dataset.mean, std=dataset.std,
      class_names=dataset.class_names or (), step=int(step_dir.name), checkpoint=str(step_dir),
      experiment=config.get('experiment'), check=check,
      preprocessing=metadata.preprocessing(dataset), **extra)
  if fmt == 'stablehlo':
    meta['platforms'] = list(export.stablehlo.PLATFORMS)
  meta_path = metadata.write(path, meta)
  print(summary_line(meta, path, time.perf_counter() - started))
  print(f'metadata: {meta_path}')
  return meta


def summary_line(meta: dict, path: pathlib.Path, seconds: float) -> str:
  size = path.stat().st_size / 2**20
  shape = tuple('N' if d is None else d for d in meta['input']['shape'])
  head = (f"{meta['format']}: {path} ({size:.2f} MiB, input {meta['input']['layout']} "
          f"{shape} float32) from step {meta['source_checkpoint']['step']}")
  if meta.get('int8'):
    q = meta['int8']
    drop = 100 * (q['float32_accuracy'] - q['int8_accuracy'])
    return (f"{head}; test accuracy int8 {q['int8_accuracy']:.2%} vs float32 "
            f"{q['float32_accuracy']:.2%} (drop {drop:.2f} points), top-1 agreement "
            f"{q['top1_agreement']:.2%}, {q['size_ratio']:.2f}x smaller than float32 ONNX; "
            f"{seconds:.0f} s")
  c = meta['check']
  return (f"{head}; checked on {c['images']} test images: max relative logit error "
          f"{c['max_relative_error']:.1e}, top-1 identical, test accuracy {c['accuracy']:.2%}; "
          f"{seconds:.0f} s")
