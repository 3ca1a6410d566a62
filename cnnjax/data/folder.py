"""folder:<path>: user images in one folder per class, read through tfds' ImageFolder.

Layout (tfds' ImageFolder convention; .png, .jpg and .jpeg files)::

  <path>/
    train/
      cat/  001.png  002.png ...
      dog/  ...
    test/
      cat/  ...
      dog/  ...

Labels are the class folder names in sorted order (`Dataset.class_names`). All images must
share one height and width. The channel count is taken from the first training image:
grayscale files give (H, W, 1), anything else is decoded as RGB (H, W, 3).
"""
from __future__ import annotations

import os

import numpy as np

from cnnjax.data.dataset import DataError, Dataset
from cnnjax.data.tfds_source import import_tf, import_tfds

SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
LAYOUT = '<path>/train/<class>/*.png and <path>/test/<class>/*.png (or .jpg)'


def _first_image(split_dir: str) -> str | None:
  for label in sorted(os.listdir(split_dir)):
    class_dir = os.path.join(split_dir, label)
    if os.path.isdir(class_dir):
      for f in sorted(os.listdir(class_dir)):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          return os.path.join(class_dir, f)
  return None


def _channels(tf, path: str, name: str) -> int:
  try:
    image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
  except tf.errors.OpError as e:
    raise DataError(f'{name}: cannot decode the image {path}.') from e
  return 1 if image.shape[-1] in (1, 2) else 3


def _read_split(tfds, tf, builder, split: str, name: str):
  images, labels = [], []
  first = None
  try:
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
      filename = example['image/filename'].decode()
      if first is None:
        first = (example['image'].shape, filename)
      elif example['image'].shape[:2] != first[0][:2]:
        raise DataError(f'{name}: images must share one size, but {first[1]} is '
                        f'{first[0][1]}x{first[0][0]} and {filename} is '
                        f'{example["image"].shape[1]}x{example["image"].shape[0]} '
                        '(width x height); resize them first.')
      images.append(example['image'])
      labels.append(example['label'])
  except tf.errors.OpError as e:
    raise DataError(f'{name}: cannot decode an image in {split}/ '
                    f'({e.message.splitlines()[0] if e.message else type(e).__name__}).') from e
  return np.stack(images), np.asarray(labels, np.int32)


def load(path: str) -> Dataset:
  """Loads `<path>/train` and `<path>/test` (one sub-folder per class) into memory."""
  root = os.path.abspath(os.path.expanduser(path))
  name = f'folder:{root}'
  if not os.path.isdir(root):
    raise DataError(f'{name}: no such folder (expected {LAYOUT}).')
  for split in SPLITS:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise DataError(f'{name}: has no {split}/ folder (expected {LAYOUT}).')
    if _first_image(split_dir) is None:
      raise DataError(f'{name}: {split}/ has no class folders with .png/.jpg images '
                      f'(expected {LAYOUT}).')
  tf = import_tf()
  tfds = import_tfds()
  channels = _channels(tf, _first_image(os.path.join(root, 'train')), name)
  builder = tfds.folder_dataset.ImageFolder(root, shape=(None, None, channels))
  arrays = {split: _read_split(tfds, tf, builder, split, name) for split in SPLITS}
  if arrays['train'][0].shape[1:3] != arrays['test'][0].shape[1:3]:
    raise DataError(f'{name}: train images are {arrays["train"][0].shape[2]}x'
                    f'{arrays["train"][0].shape[1]} but test images are '
                    f'{arrays["test"][0].shape[2]}x{arrays["test"][0].shape[1]}; all images '
                    'must share one size.')
  class_names = builder.info.features['label'].names
  return Dataset.from_arrays(name, *arrays['train'], *arrays['test'],
                             num_classes=len(class_names), class_names=class_names)
