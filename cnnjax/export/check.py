"""What every export shares: the model as one eval-mode function, the optional packages, and the
check that an exported model computes the JAX model's logits on real images.

The check runs the exported model and the JAX model (`model.apply(variables, x, train=False)`,
jit-compiled, BatchNorm on its running statistics) on the same normalized images, in batches of
one fixed size (the last one padded), and requires

* the largest logit difference over all images, relative to the largest JAX logit
  (``max|exported - jax| / max|jax|``), to be at most `tolerance` (1e-5 for float32 exports), and
* the same top-1 class for every image.

Anything else raises `ExportError` with one sentence naming the format, the model and what
differed, and the caller keeps nothing of that export.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.errors import ExportError

TOLERANCE = 1e-5
PIP_EXPORT = 'pip install -e ".[export]"'   # the extra that brings every export's packages
# The package each route imports, and the pip install that brings it alone.
PACKAGES = {'jax2onnx': 'pip install jax2onnx==0.13.0', 'onnx': 'pip install onnx',
            'onnxruntime': 'pip install onnxruntime', 'tensorflow': 'pip install tensorflow-cpu',
            'ai_edge_litert': 'pip install ai-edge-litert'}


def require(module: str, purpose: str):
  """Imports `module` or raises ExportError naming the pip install that brings it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ExportError(f'{purpose} needs the Python package {module}, which is not installed: '
                      f'{PACKAGES.get(module, "pip install " + module)} (or {PIP_EXPORT} '
                      f'for every export format).') from None


def forward(model, variables) -> Callable[[jax.Array], jax.Array]:
  """The model in evaluation mode as a function of a float32 NHWC batch: the logits."""
  def logits(x):
    return model.apply(variables, x, train=False).astype(jnp.float32)
  return logits


def batched(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
            batch_size: int) -> np.ndarray:
  """`run` over `images` in batches of exactly `batch_size` (the last padded with zeros), so each
  runtime compiles or allocates for one shape only."""
  batch_size = max(1, min(batch_size, len(images)))
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]),
                                              batch.dtype)])
    out.append(np.asarray(run(np.ascontiguousarray(batch)), np.float32)[:real])
  return np.concatenate(out)


def jax_logits(model, variables, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
  """The JAX model's logits of `images` (normalized float32 NHWC): what an export must match."""
  run = jax.jit(forward(model, variables))
  return batched(lambda x: run(jnp.asarray(x)), images, batch_size)


@dataclasses.dataclass(frozen=True)
class Agreement:
  """How an exported model's logits compare with the JAX model's on `images` test images."""
  images: int
  max_relative_error: float      # max|exported - jax| / max|jax| over every logit
  top1_mismatches: int           # images whose predicted class differs
  accuracy: float | None = None  # the exported model's top-1 accuracy, when labels are given
  reference_accuracy: float | None = None  # the JAX model's

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def compare(got: np.ndarray, want: np.ndarray, labels: np.ndarray | None = None) -> Agreement:
  """The agreement of logits `got` with the reference `want` (and accuracies, given labels)."""
  if got.shape != want.shape:
    raise ExportError(f'the exported model returned logits of shape {got.shape}, the JAX model '
                      f'{want.shape}.')
  scale = float(np.max(np.abs(want))) or 1.0
  error = float(np.max(np.abs(got - want))) / scale if got.size else 0.0
  if not np.all(np.isfinite(got)):
    error = float('inf')
  top_got, top_want = got.argmax(-1), want.argmax(-1)
  accuracy = reference = None
  if labels is not None:
    accuracy, reference = float(np.mean(top_got == labels)), float(np.mean(top_want == labels))
  return Agreement(len(got), error, int(np.sum(top_got != top_want)), accuracy, reference)


def check(what: str, got: np.ndarray, want: np.ndarray, labels: np.ndarray | None = None,
          tolerance: float = TOLERANCE) -> Agreement:
  """`compare`, raising ExportError when the logits differ by more than `tolerance` or any
  top-1 class differs. `what` names the export in the sentence ('the ONNX export of resnet18')."""
  agreement = compare(got, want, labels)
  if agreement.max_relative_error > tolerance or agreement.top1_mismatches:
    raise ExportError(
        f'{what} differs from the JAX model on {agreement.images} test images: max relative '
        f'logit error {agreement.max_relative_error:.2e} (allowed {tolerance:.0e}) and '
        f'{agreement.top1_mismatches} different top-1 classes; nothing was kept.')
  return agreement
