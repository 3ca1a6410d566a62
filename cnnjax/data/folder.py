"""folder:<path>: user images in one folder per class, read into memory for the fast path.

Layout (torchvision's ImageFolder convention; .jpg, .jpeg, .png, .bmp, .webp, ... files)::

  <path>/
    train/
      cat/  001.jpg  002.jpg ...
      dog/  ...
    test/          (or val/)
      cat/  ...
      dog/  ...

Labels are the train class folders in sorted order (`Dataset.class_names`). The files are
found and checked by `sources.open_folder` and decoded by the loader's workers
(`loader.read_split`). In memory all images must share one size; folders of varied sizes
stream instead (`data.image_size`, `cnnjax.data.stream`). The channel count is the first
training image's: grayscale gives (H, W, 1), anything else RGB (H, W, 3), and the other images
are converted to it.
"""
from __future__ import annotations

from cnnjax.data import loader, sources, transforms
from cnnjax.data.dataset import Dataset

DEFAULT_WORKERS = 4


def load(path: str, workers: int = DEFAULT_WORKERS) -> Dataset:
  """Decodes `<path>/train` and `<path>/test` (or `val`) into memory."""
  train, test, info = sources.open_folder(path)
  shape = sources.first_shape(train, info.channels)
  transform = transforms.StoredSize(shape)
  arrays = [loader.read_split(split, transform, shape, workers) for split in (train, test)]
  return Dataset.from_arrays(info.name, *arrays[0], *arrays[1], num_classes=info.num_classes,
                             class_names=info.class_names)
