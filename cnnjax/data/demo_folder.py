"""mnist5k as an image folder: offline, real data for the folder recipe, its tests and the docs.

`write_digits(root)` writes the 4,000 train / 1,000 test digits of mnist5k as grayscale JPEG
files, `root/train/<digit>/*.jpg` and `root/test/<digit>/*.jpg`, each upscaled to its own size
between 28 and 64 pixels (bicubic; the size is a function of the digit's index), so the folder
has the varied sizes of real photo collections. Deterministic; done once (a marker file records
it), about 10 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

MARKER = 'cnnjax_digits.json'
SIZES = (28, 64)


def write_digits(root: str | pathlib.Path, dataset=None, quality: int = 95) -> pathlib.Path:
  """Writes the digit folder under `root` (unless already there); returns `root`.

  `dataset` defaults to `load_dataset('mnist5k')`; any uint8 Dataset works."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root).expanduser().absolute()
  if (root / MARKER).is_file():
    return root
  if dataset is None:
    from cnnjax.data.load import load_dataset  # pylint: disable=g-import-not-at-top
    dataset = load_dataset('mnist5k')
  names = dataset.class_names or tuple(str(c) for c in range(dataset.num_classes))
  rng = np.random.default_rng(0)
  for split, images, labels in (('train', dataset.x_train, dataset.y_train),
                                ('test', dataset.x_test, dataset.y_test)):
    sizes = rng.integers(SIZES[0], SIZES[1] + 1, (len(images), 2))
    for name in names:
      os.makedirs(root / split / name, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
      pixels = image[..., 0] if image.shape[-1] == 1 else image
      w, h = (int(v) for v in sizes[i])
      Image.fromarray(pixels).resize((w, h), Image.BICUBIC).save(
          root / split / names[label] / f'{i:05d}.jpg', quality=quality)
  (root / MARKER).write_text(json.dumps({'source': dataset.name, 'sizes': SIZES}))
  return root
