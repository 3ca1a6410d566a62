"""Export a trained model to StableHLO, ONNX and TFLite, and quantize it to int8 ONNX; every
export is checked against the JAX model on real images.

>>> from cnnjax import export
>>> export.to_onnx(model, variables, 'mnist_cnn.onnx', test_images, test_labels)
Agreement(images=1000, max_relative_error=4.1e-07, top1_mismatches=0, accuracy=0.984, ...)

Each function writes the model file, runs it in its own runtime (``jax.export.deserialize``,
onnxruntime, the LiteRT interpreter) on `images` and compares its logits with
``model.apply(variables, images, train=False)``: relative error at most 1e-5 and the same top-1
class for every image (`cnnjax.export.check`), else it raises `cnnjax.errors.ExportError` and
leaves no file behind (an earlier file at `path` stays). `images` is either an array of
normalized float32 NHWC images (the model's own input; `labels` optional), or a dataset, a
`cnnjax.data.Dataset` or a streamed `cnnjax.data.stream.Stream` (what `runner.load_data`
returns), whose test split is read batch by batch as evaluation reads it, normalized with its
mean and std, and never held whole. `quantize_int8` writes an int8 ONNX model and reports its
accuracy next to the float32 model's. `python run.py --experiment X --export FORMAT` does this
for a trained run (run_export.py).
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.export import check as check_lib
from cnnjax.export import onnx_model, quantize, stablehlo, tflite
from cnnjax.errors import ExportError
from cnnjax.export.check import Agreement

__all__ = ['to_stablehlo', 'to_onnx', 'to_tflite', 'quantize_int8', 'Agreement']

CHECK_BATCH = 250  # images per batch when checking (the last batch is padded)


def input_shape(images) -> tuple[int, int, int]:
  """(H, W, C) of one image of `images` (an array, or a dataset's eval crop)."""
  shape = images.image_shape if hasattr(images, 'eval_batches') else np.shape(images)[1:]
  return tuple(int(d) for d in shape)


def _agreements(model, variables, runs: dict, images, labels, reference) -> dict:
  """Each of `runs` compared with the JAX model on every test image, in one pass."""
  jax_run = None
  if reference is None:
    jitted = jax.jit(check_lib.forward(model, variables))
    jax_run = lambda x: jitted(jnp.asarray(x))  # noqa: E731
  batches = check_lib.image_batches(images, labels, reference, CHECK_BATCH)
  return check_lib.measure(runs, batches, jax_run)


def _write_checked(blob: bytes, path, runs_of: Callable[[pathlib.Path], dict], model, variables,
                   images, labels, reference, checked: tuple[str, ...]) -> dict:
  """Writes `blob` beside `path`, compares the models `runs_of(that file)` on the test images,
  checks those named in `checked` (keys are the sentences' names), and only then moves the file
  to `path`; returns every agreement."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  partial.write_bytes(blob)
  try:
    agreements = _agreements(model, variables, runs_of(partial), images, labels, reference)
    for what in checked:
      check_lib.check(what, agreements[what])
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  os.replace(partial, path)
  return agreements


def _checked(what: str, blob: bytes, path, run_of: Callable[[pathlib.Path], Callable], model,
             variables, images, labels, reference) -> Agreement:
  return _write_checked(blob, path, lambda p: {what: run_of(p)}, model, variables, images,
                        labels, reference, (what,))[what]


def to_stablehlo(model, variables, path, images, labels: np.ndarray | None = None,
                 *, reference: np.ndarray | None = None) -> Agreement:
  """Serializes the model with `jax.export` (batch-polymorphic, CPU/CUDA/TPU) to `path`, reloads
  it with `jax.export.deserialize` and checks it on `images`."""
  exported = stablehlo.export(model, variables, input_shape(images))
  return _checked(f'the StableHLO export of {type(model).__name__}', exported.serialize(), path,
                  stablehlo.runner, model, variables, images, labels, reference)


def to_onnx(model, variables, path, images, labels: np.ndarray | None = None,
            *, layout: str = 'nhwc', reference: np.ndarray | None = None) -> Agreement:
  """Converts the model with jax2onnx (dynamic batch, `layout` 'nhwc' (default) or 'nchw'
  input), saves it to `path` and checks it in onnxruntime on `images`."""
  name = type(model).__name__
  blob = onnx_model.export(model, variables, input_shape(images), layout=layout, name=name)
  return _checked(f'the ONNX export of {name}', blob, path,
                  lambda p: onnx_model.runner(p, layout), model, variables, images, labels,
                  reference)


def to_tflite(model, variables, path, images, labels: np.ndarray | None = None,
              *, reference: np.ndarray | None = None) -> Agreement:
  """Converts the model through jax2tf and TFLiteConverter to a LiteRT flatbuffer at `path` and
  checks it in the LiteRT interpreter on `images`."""
  blob = tflite.export(model, variables, input_shape(images))
  return _checked(f'the TFLite export of {type(model).__name__}', blob, path,
                  lambda p: tflite.runner(p.read_bytes()), model, variables, images, labels,
                  reference)


def quantize_int8(model, variables, path, images, labels: np.ndarray | None = None,
                  calibration_images: np.ndarray | None = None, *, layout: str = 'nhwc',
                  reference: np.ndarray | None = None) -> dict:
  """Writes an int8 ONNX model (per-channel weights, activations calibrated on
  `calibration_images`: normalized float32 NHWC; for a dataset, default its training images,
  `quantize.calibration_images`) to `path`, and returns the accuracies of it and of the float32
  ONNX model it quantizes on the test images (one pass, the float32 model checked), their
  agreement and both file sizes."""
  name = type(model).__name__
  shape = input_shape(images)
  normalization = None
  if calibration_images is None:
    if not hasattr(images, 'eval_batches'):
      raise ExportError('quantize_int8 needs calibration_images (normalized training images) '
                        'when the test images are an array.')
    calibration_images = quantize.calibration_images(images)
    normalization = (images.mean, images.std)
  float_blob = onnx_model.export(model, variables, shape, layout=layout, name=name)
  int8_blob = quantize.quantize_int8(float_blob, calibration_images, layout,
                                     normalization=normalization)
  float_what = f'the ONNX export of {name}'
  agreements = _write_checked(
      int8_blob, path, lambda p: {float_what: onnx_model.runner(float_blob, layout),
                                  'int8': onnx_model.runner(p, layout)},
      model, variables, images, labels, reference, (float_what,))
  float32, int8 = agreements[float_what], agreements['int8']
  return {'float32_accuracy': float32.reference_accuracy, 'int8_accuracy': int8.accuracy,
          'top1_agreement': 1 - int8.top1_mismatches / max(int8.images, 1),
          'float32_bytes': len(float_blob), 'int8_bytes': len(int8_blob),
          'size_ratio': len(float_blob) / len(int8_blob), 'images': int8.images,
          'calibration_images': len(calibration_images)}
