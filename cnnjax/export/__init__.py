"""Export a trained model to StableHLO, ONNX and TFLite, and quantize it to int8 ONNX; every
export is checked against the JAX model on real images.

>>> from cnnjax import export
>>> export.to_onnx(model, variables, 'mnist_cnn.onnx', test_images, test_labels)
Agreement(images=1000, max_relative_error=4.1e-07, top1_mismatches=0, accuracy=0.984, ...)

Each function writes the model file, runs it in its own runtime (``jax.export.deserialize``,
onnxruntime, the LiteRT interpreter) on `images` (normalized float32 NHWC: the model's own
input) and compares its logits with ``model.apply(variables, images, train=False)``: relative
error at most 1e-5 and the same top-1 class for every image (`cnnjax.export.check`), else it
raises `cnnjax.errors.ExportError` and leaves no file behind (an earlier file at `path` stays).
`quantize_int8` writes an int8 ONNX model and reports its accuracy next to the float32 model's.
`python run.py --experiment X --export FORMAT` does this for a trained run (run_export.py).
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable

import numpy as np

from cnnjax.export import check as check_lib
from cnnjax.export import onnx_model, quantize, stablehlo, tflite
from cnnjax.export.check import Agreement

__all__ = ['to_stablehlo', 'to_onnx', 'to_tflite', 'quantize_int8', 'Agreement']

CHECK_BATCH = 250  # images per batch when checking (the last batch is padded)


def _checked(what: str, blob: bytes, path, run_of: Callable[[pathlib.Path], Callable],
             images, labels, reference) -> Agreement:
  """Writes `blob` beside `path`, checks the file it wrote, and only then moves it to `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  partial.write_bytes(blob)
  try:
    got = check_lib.batched(run_of(partial), images, CHECK_BATCH)
    agreement = check_lib.check(what, got, reference, labels)
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  os.replace(partial, path)
  return agreement


def _reference(model, variables, images, reference):
  if reference is None:
    return check_lib.jax_logits(model, variables, images, CHECK_BATCH)
  return reference


def to_stablehlo(model, variables, path, images: np.ndarray, labels: np.ndarray | None = None,
                 *, reference: np.ndarray | None = None) -> Agreement:
  """Serializes the model with `jax.export` (batch-polymorphic, CPU/CUDA/TPU) to `path`, reloads
  it with `jax.export.deserialize` and checks it on `images`."""
  exported = stablehlo.export(model, variables, images.shape[1:])
  return _checked(f'the StableHLO export of {type(model).__name__}', exported.serialize(), path,
                  stablehlo.runner, images, labels,
                  _reference(model, variables, images, reference))


def to_onnx(model, variables, path, images: np.ndarray, labels: np.ndarray | None = None,
            *, layout: str = 'nhwc', reference: np.ndarray | None = None) -> Agreement:
  """Converts the model with jax2onnx (dynamic batch, `layout` 'nhwc' (default) or 'nchw'
  input), saves it to `path` and checks it in onnxruntime on `images`."""
  name = type(model).__name__
  blob = onnx_model.export(model, variables, images.shape[1:], layout=layout, name=name)
  return _checked(f'the ONNX export of {name}', blob, path,
                  lambda p: onnx_model.runner(p, layout), images, labels,
                  _reference(model, variables, images, reference))


def to_tflite(model, variables, path, images: np.ndarray, labels: np.ndarray | None = None,
              *, reference: np.ndarray | None = None) -> Agreement:
  """Converts the model through jax2tf and TFLiteConverter to a LiteRT flatbuffer at `path` and
  checks it in the LiteRT interpreter on `images`."""
  blob = tflite.export(model, variables, images.shape[1:])
  return _checked(f'the TFLite export of {type(model).__name__}', blob, path,
                  lambda p: tflite.runner(p.read_bytes()), images, labels,
                  _reference(model, variables, images, reference))


def quantize_int8(model, variables, path, images: np.ndarray, labels: np.ndarray,
                  calibration_images: np.ndarray, *, layout: str = 'nhwc',
                  reference: np.ndarray | None = None) -> dict:
  """Writes an int8 ONNX model (per-channel weights, activations calibrated on
  `calibration_images`) to `path`, after checking the float32 ONNX model it quantizes, and
  returns both accuracies on (`images`, `labels`), their agreement and both file sizes."""
  name = type(model).__name__
  reference = _reference(model, variables, images, reference)
  float_blob = onnx_model.export(model, variables, images.shape[1:], layout=layout, name=name)
  float_run = onnx_model.runner(float_blob, layout)
  float_agreement = check_lib.check(f'the ONNX export of {name}',
                                    check_lib.batched(float_run, images, CHECK_BATCH),
                                    reference, labels)
  int8_blob = quantize.quantize_int8(float_blob, calibration_images, layout)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  partial.write_bytes(int8_blob)
  try:
    int8_logits = check_lib.batched(onnx_model.runner(partial, layout), images, CHECK_BATCH)
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  os.replace(partial, path)
  int8 = check_lib.compare(int8_logits, reference, labels)
  return {'float32_accuracy': float_agreement.reference_accuracy, 'int8_accuracy': int8.accuracy,
          'top1_agreement': 1 - int8.top1_mismatches / max(int8.images, 1),
          'float32_bytes': len(float_blob), 'int8_bytes': len(int8_blob),
          'size_ratio': len(float_blob) / len(int8_blob), 'images': int8.images,
          'calibration_images': len(calibration_images)}
