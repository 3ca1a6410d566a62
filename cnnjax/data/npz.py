"""npz:<path>: user data as one NumPy .npz file.

The file holds the arrays `x_train`, `y_train`, `x_test`, `y_test`:

* images uint8 (N, H, W, C), or grayscale (N, H, W) which gets a channel axis; other integer
  dtypes are accepted when every value lies in [0, 255];
* labels integers in [0, num_classes), shape (N,) or (N, 1).

Optional: `num_classes` (a scalar; default: the largest label + 1) and `class_names` (strings).
Write one with `np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)`.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from cnnjax.data.dataset import DataError, Dataset

REQUIRED = ('x_train', 'y_train', 'x_test', 'y_test')


def load(path: str) -> Dataset:
  """Loads and checks an .npz dataset; every problem is a DataError naming the path."""
  path = os.path.expanduser(path)
  name = f'npz:{path}'
  if not os.path.isfile(path):
    raise DataError(f'{name}: no such file.')
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f'{name}: not a readable .npz file ({e}).') from e
  if not hasattr(archive, 'files'):
    raise DataError(f'{name}: holds a single .npy array, not an .npz archive of the arrays '
                    f'{list(REQUIRED)}.')
  try:
    with archive:
      missing = [k for k in REQUIRED if k not in archive.files]
      if missing:
        raise DataError(f'{name}: the file lacks the arrays {missing} (it has '
                        f'{sorted(archive.files)}; needed: {list(REQUIRED)}).')
      arrays = {k: archive[k] for k in REQUIRED}
      num_classes = archive['num_classes'] if 'num_classes' in archive.files else None
      class_names = archive['class_names'] if 'class_names' in archive.files else ()
  except DataError:
    raise
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f'{name}: not a readable .npz file ({e}).') from e
  if num_classes is not None:
    if num_classes.ndim != 0 or not np.issubdtype(num_classes.dtype, np.integer):
      raise DataError(f'{name}: num_classes must be a scalar integer, got '
                      f'{num_classes.dtype} of shape {num_classes.shape}.')
    num_classes = int(num_classes)
  class_names = [str(c) for c in np.asarray(class_names).reshape(-1)]
  return Dataset.from_arrays(name, arrays['x_train'], arrays['y_train'], arrays['x_test'],
                             arrays['y_test'], num_classes=num_classes,
                             class_names=class_names)
