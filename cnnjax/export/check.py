"""What every export shares: the model as one eval-mode function, the optional packages, and the
check that an exported model computes the JAX model's logits on real images.

The check runs the exported model and the JAX model (`model.apply(variables, x, train=False)`,
jit-compiled, BatchNorm on its running statistics) on the same normalized images, in batches of
one fixed size (the last one padded and masked), and requires

* the largest logit difference over all images, relative to the largest JAX logit
  (``max|exported - jax| / max|jax|``), to be at most `tolerance` (1e-5 for float32 exports), and
* the same top-1 class for every image.

Anything else raises `ExportError` with one sentence naming the format, the model and what
differed, and the caller keeps nothing of that export.

The test images come batch by batch from one of two places, and the comparison (`measure`)
accumulates over the batches, so neither the images nor the logits of the whole split are ever
held at once:

* `array_batches`: normalized float32 NHWC arrays the caller holds (the library API);
* `dataset_batches`: a run's test split, read through `eval_batches(batch_size)` as the
  runner's evaluation and `--visualize` read it (a `cnnjax.data.Dataset` in memory, or a
  `cnnjax.data.stream.Stream` decoding, resizing and center-cropping files: ImageNet's 50,000
  test images stream through one batch at a time), and normalized as evaluation normalizes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data import augment
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


Batch = dict  # {'image': normalized float32 NHWC, 'label': int32 or None, 'mask': bool,
#                'reference': the JAX model's logits of the batch, when the caller has them}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normalize(images, mean, std):
  return augment.normalize(images, mean, std)


def normalized(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 pixels as the model sees them: `augment.normalize`, as evaluation applies it."""
  return np.asarray(_normalize(jnp.asarray(images), tuple(map(float, mean)),
                               tuple(map(float, std))), np.float32)


def _padded(a: np.ndarray, size: int) -> np.ndarray:
  if len(a) == size:
    return a
  return np.concatenate([a, np.zeros((size - len(a), *a.shape[1:]), a.dtype)])


@contextlib.contextmanager
def array_batches(images: np.ndarray, labels: np.ndarray | None = None,
                  reference: np.ndarray | None = None,
                  batch_size: int = 250) -> Iterator[Iterator[Batch]]:
  """Batches of exactly `batch_size` (at most the number of images) of normalized float32 NHWC
  `images`, with their `labels` and `reference` logits when given; the last one padded."""
  images = np.asarray(images, np.float32)
  if reference is not None and len(reference) != len(images):
    raise ExportError(f'{len(reference)} reference logits were given for {len(images)} images.')
  size = max(1, min(batch_size, len(images)))

  def batches():
    for start in range(0, len(images), size):
      rows = slice(start, start + size)
      real = len(images[rows])
      yield {'image': _padded(images[rows], size), 'mask': np.arange(size) < real,
             'label': None if labels is None else _padded(np.asarray(labels)[rows], size),
             'reference': None if reference is None else _padded(reference[rows], size)}
  yield batches()


@contextlib.contextmanager
def dataset_batches(dataset, batch_size: int = 250) -> Iterator[Iterator[Batch]]:
  """The test split of `dataset` (`Dataset` or `Stream`) in batches of exactly `batch_size` (at
  most the split's size), read through `dataset.eval_batches` and normalized with the dataset's
  mean and std; the reader (and its worker processes) stops when the block exits."""
  size = max(1, min(batch_size, dataset.num_test))
  with dataset.eval_batches(size) as batches:
    yield ({'image': normalized(b['image'], dataset.mean, dataset.std),
            'label': np.asarray(b['label']), 'mask': np.asarray(b['mask'], bool),
            'reference': None} for b in batches)


def image_batches(images, labels=None, reference=None, batch_size: int = 250):
  """`dataset_batches` for a dataset (anything with `eval_batches`), else `array_batches`."""
  if hasattr(images, 'eval_batches'):
    if labels is not None or reference is not None:
      raise ExportError('a dataset brings its own labels; pass labels and reference logits '
                        'only with image arrays.')
    return dataset_batches(images, batch_size)
  return array_batches(images, labels, reference, batch_size)


def batched(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
            batch_size: int) -> np.ndarray:
  """`run`'s outputs of normalized float32 NHWC `images`, in batches of exactly `batch_size`
  (the last padded), so each runtime compiles or allocates for one shape only."""
  out = []
  with array_batches(images, batch_size=batch_size) as batches:
    for batch in batches:
      out.append(np.asarray(run(np.ascontiguousarray(batch['image'])), np.float32)[batch['mask']])
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


class Tally:
  """An `Agreement` accumulated batch by batch: the largest logit difference and the largest
  JAX logit (their ratio at the end is the relative error over all images), top-1 mismatches and
  both models' correct predictions."""

  def __init__(self):
    self.images = self.mismatches = self.correct = self.reference_correct = 0
    self.max_difference = self.max_logit = 0.0
    self.finite = self.labeled = True

  def add(self, got: np.ndarray, want: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Counts the real rows `got` (exported logits) of a batch against `want` (JAX logits)."""
    if got.shape != want.shape:
      raise ExportError(f'the exported model returned logits of shape {got.shape[1:]} per image, '
                        f'the JAX model {want.shape[1:]}.')
    self.images += len(got)
    if not got.size:
      return
    self.finite = self.finite and bool(np.all(np.isfinite(got)))
    self.max_difference = max(self.max_difference, float(np.max(np.abs(got - want))))
    self.max_logit = max(self.max_logit, float(np.max(np.abs(want))))
    top_got, top_want = got.argmax(-1), want.argmax(-1)
    self.mismatches += int(np.sum(top_got != top_want))
    if labels is None:
      self.labeled = False
    else:
      self.correct += int(np.sum(top_got == labels))
      self.reference_correct += int(np.sum(top_want == labels))

  def agreement(self) -> Agreement:
    error = self.max_difference / (self.max_logit or 1.0) if self.finite else float('inf')
    accuracy = reference = None
    if self.labeled and self.images:
      accuracy, reference = self.correct / self.images, self.reference_correct / self.images
    return Agreement(self.images, error, self.mismatches, accuracy, reference)


def measure(runs: dict[str, Callable[[np.ndarray], np.ndarray]], batches,
            reference: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Agreement]:
  """Runs every exported model of `runs` and the JAX model (`reference`, where a batch brings
  no reference logits) on each batch of `batches` (an `image_batches` block) once, and returns each
  model's `Agreement` over all real rows."""
  tallies = {name: Tally() for name in runs}
  with batches as stream:
    for batch in stream:
      mask, x = batch['mask'], np.ascontiguousarray(batch['image'])
      want = batch.get('reference')
      want = np.asarray(reference(x) if want is None else want, np.float32)[mask]
      labels = None if batch.get('label') is None else np.asarray(batch['label'])[mask]
      for name, run in runs.items():
        tallies[name].add(np.asarray(run(x), np.float32)[mask], want, labels)
  return {name: tally.agreement() for name, tally in tallies.items()}


def check(what: str, agreement: Agreement, tolerance: float = TOLERANCE) -> Agreement:
  """`agreement`, or ExportError when the logits differ by more than `tolerance` or any top-1
  class differs. `what` names the export in the sentence ('the ONNX export of resnet18')."""
  if agreement.max_relative_error > tolerance or agreement.top1_mismatches:
    raise ExportError(
        f'{what} differs from the JAX model on {agreement.images} test images: max relative '
        f'logit error {agreement.max_relative_error:.2e} (allowed {tolerance:.0e}) and '
        f'{agreement.top1_mismatches} different top-1 classes; nothing was kept.')
  return agreement
