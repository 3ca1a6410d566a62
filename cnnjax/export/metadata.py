"""What a deployer needs beside an exported model, written as `<model file>.json`.

Every exported model takes normalized float32 images and returns logits; the JSON says how to
feed it: the input's name, shape (``null`` = any batch size), dtype and layout; the
normalization (``x = (pixels - mean) / std`` per channel, pixels in 0-255); the class names when
the dataset has them; for a streamed dataset cropped to `data.image_size`, the resize and center
crop that made the test images the input size (PIL bilinear, as cnnjax.data.transforms does);
the cnnjax and JAX versions; the checkpoint (step and directory) it was
exported from; and the check against the JAX model on the test images.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax

import cnnjax


def input_spec(input_shape: Sequence[int], layout: str) -> dict[str, Any]:
  """The model input: 'image', float32, (batch, H, W, C) or (batch, C, H, W)."""
  h, w, c = (int(d) for d in input_shape)
  shape = [None, h, w, c] if layout == 'nhwc' else [None, c, h, w]
  return {'name': 'image', 'shape': shape, 'dtype': 'float32', 'layout': layout.upper()}


def preprocessing(dataset) -> dict[str, Any] | None:
  """How `dataset`'s evaluation turns a decoded image into the input size, when it does
  (a streamed dataset with `data.image_size`); None when images are used as stored."""
  from cnnjax.data import transforms  # late: PIL is needed only here
  eval_transform = getattr(dataset, 'eval_transform', None)
  if not isinstance(eval_transform, transforms.EvalTransform):
    return None
  short = transforms.eval_resize(eval_transform.size, eval_transform.crop_fraction)
  return {'resize_short_side': short, 'center_crop': eval_transform.size,
          'interpolation': 'bilinear',
          'steps': f'resize the short side to {short} px (bilinear), center-crop '
                   f'{eval_transform.size}x{eval_transform.size}, then normalize'}


def describe(*, fmt: str, file: str, model_name: str, input_shape: Sequence[int],
             layout: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
             class_names: Sequence[str] = (), step: int | None = None,
             checkpoint: str | None = None, experiment: str | None = None,
             check: dict | None = None, preprocessing: dict | None = None, **extra) -> dict[str, Any]:
  """The metadata dictionary of one exported model file."""
  return {
      'format': fmt,
      'file': file,
      'model': model_name,
      'experiment': experiment,
      'input': input_spec(input_shape, layout),
      'output': {'name': 'logits', 'shape': [None, int(num_classes)], 'dtype': 'float32'},
      'normalization': {'mean': [float(m) for m in mean], 'std': [float(s) for s in std],
                        'formula': 'x = (pixels - mean) / std per channel, pixels in 0-255'},
      'preprocessing': preprocessing,
      'class_names': list(class_names) or None,
      'source_checkpoint': {'step': step, 'directory': checkpoint},
      'cnnjax_version': cnnjax.__version__,
      'jax_version': jax.__version__,
      'check': check,
      **extra,
  }


def write(model_path: str | pathlib.Path, meta: dict[str, Any]) -> pathlib.Path:
  """Writes `meta` as `<model_path>.json` and returns that path."""
  path = pathlib.Path(f'{model_path}.json')
  path.write_text(json.dumps(meta, indent=2) + '\n')
  return path
