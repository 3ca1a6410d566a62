"""Look inside a trained run: `python run.py --experiment X --visualize LAYER`.

`visualize(config, workdir, layer)` loads the newest checkpoint in `workdir`, rebuilds the model
from the experiment config and writes three PNGs into `<workdir>/visualize/`: LAYER's feature
maps for a test image, the first convolution's filters, and the confusion matrix over the whole
test set. It runs on one device and writes nothing else. Streamed datasets (image folders,
ImageNet) are read batch by batch through the loader, as evaluation reads them.
"""
from __future__ import annotations

import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import checkpoint, layers, models, viz
from cnnjax.data import augment
from cnnjax.errors import CheckpointError, ConfigError


def load_trained(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
  """(model, variables, dataset, step directory) of the newest checkpoint in `workdir`."""
  from cnnjax import runner  # late: runner pulls in the whole training stack
  workdir = pathlib.Path(workdir)
  try:
    variables, step_dir = checkpoint.load_variables(workdir)
  except checkpoint.CheckpointError as e:
    if not (workdir / 'checkpoints').is_dir():
      raise CheckpointError(
          f'{workdir} holds no checkpoint to visualize; train first with python run.py '
          f'--experiment {config.get("experiment") or "<name>"} --workdir {workdir}.') from None
    raise
  dataset = runner.load_data(config)
  model = runner.build_model(config, dataset)
  checkpoint.check_fits(variables, model, dataset.image_shape, step_dir, config.model.name)
  return model, variables, dataset, step_dir


def first_conv_kernel(model, variables, x: jax.Array) -> tuple[str, np.ndarray]:
  """('path', HWIO kernel) of the first convolution the model applies to ``x``.

  Forward order, seen by intercepting the layer calls of an abstract evaluation pass (nothing is
  computed): a restored checkpoint's parameters come in sorted key order, which for airbench94
  puts ``group1/conv1`` before the ``whiten`` conv that sees the image.
  """
  called = []

  def intercept(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, layers.Conv2d):
      called.append(context.module.path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  if not called:
    raise ConfigError(f'{type(model).__name__} has no convolution whose filters could be drawn.')
  node = variables['params']
  for key in called[0]:
    node = node[key]
  return '/'.join(called[0]), np.asarray(node['kernel'])


def predict(model, variables, dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels, predicted classes) of every test image (evaluation mode), read in batches of
  `batch_size` (in memory, or streamed from the files: never the whole split at once)."""
  @jax.jit
  def classify(batch):
    logits = model.apply(variables, augment.normalize(batch, dataset.mean, dataset.std),
                         train=False)
    return jnp.argmax(logits, axis=-1)

  labels, predictions = [], []
  with dataset.eval_batches(batch_size) as batches:
    for batch in batches:
      mask = np.asarray(batch['mask'])
      labels.append(np.asarray(batch['label'])[mask])
      predictions.append(np.asarray(classify(batch['image']))[mask])
  return np.concatenate(labels), np.concatenate(predictions)


def visualize(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, layer: str,
              image_index: int = 0) -> dict[str, pathlib.Path]:
  """Writes LAYER's feature maps, the first-layer filters and the confusion matrix as PNGs."""
  workdir = pathlib.Path(workdir)
  model, variables, dataset, step_dir = load_trained(config, workdir)
  if not 0 <= image_index < dataset.num_test:
    raise ConfigError(f'image_index {image_index} is outside the {dataset.num_test} test '
                      f'images.')
  out_dir = workdir / 'visualize'
  image, label = dataset.test_image(image_index)
  image = image[None]
  x = augment.normalize(jnp.asarray(image), dataset.mean, dataset.std)
  maps = models.activations(model, variables, x, layer)
  name = dataset.class_names[label] if dataset.class_names else str(label)
  safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', layer)
  paths = {'activations': viz.plot_activations(
      maps, out_dir / f'activations_{safe}.png', image=image[0],
      title=f'{layer} of test image {image_index} (class {name}), step {step_dir.name}')}
  conv_name, kernel = first_conv_kernel(model, variables, x)
  paths['filters'] = viz.plot_filters(kernel, out_dir / 'filters.png', title=f'{conv_name} filters')
  labels, predictions = predict(model, variables, dataset, config.train.eval_batch_size)
  matrix = viz.confusion_matrix(labels, predictions, dataset.num_classes)
  paths['confusion_matrix'] = viz.plot_confusion_matrix(
      matrix, out_dir / 'confusion_matrix.png', dataset.class_names or None,
      title=f'{config.get("experiment") or config.model.name} step {step_dir.name}')
  accuracy = np.trace(matrix) / max(matrix.sum(), 1)
  for kind, path in paths.items():
    print(f'{kind}: {path}' + (f' (test accuracy {accuracy:.2%})' if kind == 'confusion_matrix'
                               else ''))
  return paths
