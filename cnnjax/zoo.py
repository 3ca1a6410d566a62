"""The zoo by name with its weights: ``cnnjax.pretrained(name, weights=PATH, num_classes=None)``.

>>> model, variables = cnnjax.pretrained('resnet50', weights='resnet50-0676ba61.pth')
>>> logits = model.apply(variables, images)                  # NHWC, eval mode
>>> model, variables = cnnjax.pretrained('convnext_tiny', weights=path, num_classes=10)

``weights`` is a torchvision state_dict (``.pth`` read with ``weights_only=True``, or
``.safetensors``) or a cnnjax checkpoint directory; by default torchvision's own cache
(``~/.cache/torch/hub/checkpoints/<official file>``). A missing file names torchvision's
official download URL for that model. Loading is strict (cnnjax.transfer): every parameter
and BatchNorm statistic must come from the file, except the classifier head when
``num_classes`` differs from the file's: those layers (the parameters whose only mismatch is
the class count) start from the model's own initialization, and a line says so.
"""
from __future__ import annotations

import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp

from cnnjax import torchvision_weights
from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.models import get_model


def _head_paths(target: dict, source: dict, num_classes: int) -> list[str]:
  """The paths whose shapes differ between `target` and `source` only in a last axis of
  ``num_classes`` (the classifier head); raises if anything else differs."""
  head = []
  for key, value in target.items():
    if key in source and tuple(source[key].shape) != tuple(value.shape):
      got, want = tuple(source[key].shape), tuple(value.shape)
      if got[:-1] != want[:-1] or want[-1] != num_classes:
        raise CheckpointError(f'{key[0]}/{key[1]} has shape {got} in the weights but {want} in '
                              f'the model: not only the classifier head differs.')
      head.append(key[1])
  return sorted(head)


def pretrained(name: str, weights: str | pathlib.Path | None = None,
               num_classes: int | None = None, *, image_size: int = 224, seed: int = 0,
               **model_kwargs: Any) -> tuple[Any, dict]:
  """(model, variables) of zoo model ``name`` with ``weights`` loaded; see the module docstring.

  ``image_size`` is only the input size used to initialize a fresh head (shapes do not depend
  on it); ``seed`` seeds that initialization; ``model_kwargs`` go to `get_model`.
  """
  from cnnjax import transfer  # orbax (for checkpoint directories): only when used
  if weights is None:
    if name not in torchvision_weights.IMAGENET_FILES:
      raise ConfigError(f'{name} has no official torchvision weights; pass weights=PATH (a '
                        f'.pth/.safetensors state_dict or a cnnjax checkpoint directory).')
    weights = torchvision_weights.imagenet_weights_path(name)
  source, what = transfer.load_source(weights, name)
  model = get_model(name, num_classes=num_classes, **model_kwargs)
  x = jnp.zeros((1, image_size, image_size, model.in_channels))
  target = transfer.flatten_variables(jax.eval_shape(model.init, jax.random.key(seed), x))
  head = _head_paths(target, source, model.num_classes)
  if head:
    variables = jax.jit(model.init)(jax.random.key(seed), x)
    exclude = sorted({re.escape(path.rsplit('/', 1)[0]) for path in head})  # whole layers
  else:
    variables = jax.eval_shape(model.init, jax.random.key(seed), x)
    exclude = []
  variables, fresh = transfer.merge(variables, source, exclude, what, name)
  if head and jax.process_index() == 0:
    layers = sorted({path.rsplit('/', 1)[0] for path in head})
    print(f'pretrained: {name} loaded from {what}; the classifier {", ".join(layers)} is freshly '
          f'initialized for {model.num_classes} classes.')
  return model, variables
