"""Random-access sources for streaming: one example at a time, never a whole split in memory.

A source is what grain calls a random-access data source: `len(source)` and `source[i] ->
{'image': encoded bytes or uint8 pixels, 'label': int}`, plus `describe(i)` (the file or
record an error message names) and `name`. Decoding happens later, in the loader's workers
(`cnnjax.data.transforms`). Three kinds:

* `FolderSource`: `root/train/<class>/*`, `root/test/<class>/*` (or `val/`) of JPEG/PNG/...
  files of any size; only the sorted file names and labels are held (~30 bytes per image);
* `TfdsSource`: a tfds dataset prepared in `array_record` format, read through
  `tfds.data_source` (no TensorFlow needed) with the image left encoded;
* `ArraySource`: arrays already in memory (mnist5k, npz, any `Dataset`).

`open_splits(name, data_dir)` returns the train and test sources and a `SourceInfo`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import warnings
import weakref

import numpy as np

from cnnjax.errors import DataError

# torchvision's IMG_EXTENSIONS: what ImageFolder reads.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
TEST_SPLITS = ('test', 'val')  # folder names of the evaluation split, first found wins
GRAYSCALE_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')
LAYOUT = '<path>/train/<class>/*.jpg and <path>/test/<class>/*.jpg (or val/; also .png, ...)'


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What the model and the loop need to know about a dataset before reading it."""
  name: str
  num_classes: int
  channels: int
  class_names: tuple[str, ...] = ()


class _MappedForWorkers:
  """Pickles its arrays (`_ARRAYS`) as temporary .npy files that worker processes map, not as
  copies: the process that starts a worker then sends it a few hundred bytes (a copy of an
  image index or of in-memory images would be megabytes per worker, and a worker dying while
  a message over 64 KB is still being written to it blocks its parent forever)."""
  _ARRAYS: tuple[str, ...] = ()

  def __getstate__(self):
    if '_mapped' not in self.__dict__:
      paths = {}
      for key in self._ARRAYS:
        handle, paths[key] = tempfile.mkstemp(prefix='cnnjax-', suffix='.npy')
        with os.fdopen(handle, 'wb') as f:
          np.save(f, np.ascontiguousarray(getattr(self, key)))
      self._mapped = paths
      weakref.finalize(self, _remove, list(paths.values()))  # also runs at exit
    return {**{k: v for k, v in self.__dict__.items() if k not in self._ARRAYS},
            **{k: None for k in self._ARRAYS}}

  def __setstate__(self, state):
    self.__dict__.update(state)
    for key, path in state['_mapped'].items():
      setattr(self, key, np.load(path, mmap_mode='r'))
    del self.__dict__['_mapped']  # a worker pickles nothing further


def _remove(paths):
  for path in paths:
    with contextlib.suppress(OSError):
      os.remove(path)


class ArraySource(_MappedForWorkers):
  """Images and labels already in host memory, served one example at a time."""
  _ARRAYS = ('images', 'labels')

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
    self.name, self.images, self.labels = name, images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': np.asarray(self.images[index]), 'label': int(self.labels[index])}

  def describe(self, index: int) -> str:
    return f'example {index} of {self.name}'


class FolderSource(_MappedForWorkers):
  """The image files of one split folder, read as bytes on access."""
  _ARRAYS = ('files', 'labels')

  def __init__(self, name: str, directory: str, files: np.ndarray, labels: np.ndarray):
    self.name, self.directory = name, directory
    self.files = files      # bytes paths relative to `directory`, sorted by class then name
    self.labels = labels    # int32

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, index: int) -> str:
    return os.path.join(self.directory, bytes(self.files[index]).decode())

  def __getitem__(self, index: int) -> dict:
    with open(self.path(index), 'rb') as f:
      return {'image': f.read(), 'label': int(self.labels[index])}

  def describe(self, index: int) -> str:
    return self.path(index)


def _images_in(directory: str) -> list[str]:
  return sorted(e.name for e in os.scandir(directory)
                if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
                and not e.name.startswith('.'))


def _class_dirs(split_dir: str) -> list[str]:
  return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))


def _scan_split(name: str, root: str, split: str, classes: list[str], required: bool):
  """(FolderSource, classes of `classes` with no images here) for one split folder."""
  split_dir = os.path.join(root, split)
  files, labels, missing = [], [], []
  for label, cls in enumerate(classes):
    class_dir = os.path.join(split_dir, cls)
    found = _images_in(class_dir) if os.path.isdir(class_dir) else []
    if not found:
      if required:
        raise DataError(f'{name}: {split}/{cls}/ holds no images '
                        f'({"/".join(IMAGE_EXTENSIONS[:3])}, ...); add some or remove the folder.')
      missing.append(cls)
    files += [f'{cls}/{f}'.encode() for f in found]
    labels += [label] * len(found)
  return FolderSource(name, split_dir, np.asarray(files, dtype=bytes),
                      np.asarray(labels, np.int32)), missing


def _image_channels(path: str) -> int:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      return 1 if image.mode in GRAYSCALE_MODES else 3
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read the image {path} ({type(e).__name__}: {e}); replace or '
                    'remove it.') from e


def open_folder(path: str) -> tuple[FolderSource, FolderSource, SourceInfo]:
  """The train and test splits of an image folder. Labels are the train class folders in
  sorted order; the channel count is the first training image's (grayscale files give 1,
  anything else 3; other images are converted to it)."""
  root = os.path.abspath(os.path.expanduser(path))
  name = f'folder:{root}'
  if not os.path.isdir(root):
    raise DataError(f'{name}: no such folder (expected {LAYOUT}).')
  train_dir = os.path.join(root, 'train')
  if not os.path.isdir(train_dir):
    raise DataError(f'{name}: has no train/ folder (expected {LAYOUT}).')
  test = next((s for s in TEST_SPLITS if os.path.isdir(os.path.join(root, s))), None)
  if test is None:
    raise DataError(f'{name}: has no test/ or val/ folder (expected {LAYOUT}).')
  classes = _class_dirs(train_dir)
  if not classes:
    raise DataError(f'{name}: train/ has no class folders (expected {LAYOUT}).')
  test_classes = _class_dirs(os.path.join(root, test))
  if not test_classes and _images_in(os.path.join(root, test)):
    raise DataError(f'{name}: {test}/ holds images directly; sort them into one folder per '
                    f'class, {test}/<class>/, named as in train/.')
  unknown = sorted(set(test_classes) - set(classes))
  if unknown:
    raise DataError(f'{name}: {test}/ has class folders that train/ lacks: '
                    f'{", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""}; the model '
                    'cannot learn them (add them to train/ or remove them).')
  train, _ = _scan_split(name, root, 'train', classes, required=True)
  test_source, missing = _scan_split(name, root, test, classes, required=False)
  if not len(test_source):
    raise DataError(f'{name}: {test}/ holds no images in its class folders.')
  if missing:
    warnings.warn(f'{name}: {len(missing)} of {len(classes)} classes have no images in {test}/ '
                  f'({", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}); their test '
                  'accuracy is not measured.')
  channels = _image_channels(train.path(0))
  return train, test_source, SourceInfo(name, len(classes), channels, tuple(classes))


class TfdsSource:
  """One split of a tfds dataset prepared as array_record; images stay encoded (bytes)."""

  def __init__(self, name: str, split: str, data_dir: str, image_key: str, label_key: str):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key = image_key, label_key
    self._source = None

  def _open(self):
    if self._source is None:
      from cnnjax.data import tfds_source  # pylint: disable=g-import-not-at-top
      tfds = tfds_source.import_tfds()
      self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                      decoders={self.image_key: tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):  # workers reopen the files themselves
    return {**self.__dict__, '_source': None}

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict:
    example = self._open()[int(index)]
    return {'image': example[self.image_key], 'label': int(example[self.label_key])}

  def describe(self, index: int) -> str:
    return f'record {index} of tfds {self.name} {self.split} in {self.data_dir}'


def _rebuild_command(name: str, data_dir: str) -> str:
  return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
          f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"")


def open_tfds(name: str, data_dir: str | None) -> tuple[TfdsSource, TfdsSource, SourceInfo]:
  """The train and test (else validation) splits of a prepared array_record tfds dataset."""
  from cnnjax.data import tfds_source  # pylint: disable=g-import-not-at-top
  tfds = tfds_source.import_tfds()
  data_dir = tfds_source.resolve_data_dir(data_dir)
  try:
    with tfds_source.quiet_absl():
      builder = tfds.builder(name, data_dir=data_dir)
      prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'tensorflow-datasets has no dataset named {name!r} (and none is prepared '
                    f'under {data_dir}).') from e
  if not prepared:
    raise DataError(f'tfds dataset {name} is not prepared in {data_dir}; to stream it, prepare '
                    f'it as array_record: {_rebuild_command(name, data_dir)} (see the README '
                    "for ImageNet's manual download).")
  info = builder.info
  file_format = str(getattr(info.file_format, 'value', info.file_format))
  if file_format != 'array_record':
    raise DataError(f'tfds dataset {name} in {builder.data_dir} is prepared as {file_format}, '
                    f'but streaming needs random access (array_record); rebuild it: '
                    f'{_rebuild_command(name, data_dir)}, or set data.pipeline=memory if it '
                    'fits in memory.')
  if not info.supervised_keys:
    raise DataError(f'tfds dataset {name} has no (image, label) pairs to classify.')
  image_key, label_key = info.supervised_keys[:2]
  test = next((s for s in ('test', 'validation') if s in info.splits), None)
  if 'train' not in info.splits or test is None:
    raise DataError(f'tfds dataset {name} has no train and test (or validation) splits (it has '
                    f'{sorted(info.splits)}).')
  label = info.features[label_key]
  shape = getattr(info.features[image_key], 'shape', None) or (None,)
  channels = 1 if shape[-1] == 1 else 3
  sources = [TfdsSource(name, split, data_dir, image_key, label_key) for split in ('train', test)]
  return (*sources, SourceInfo(f'tfds:{name}', label.num_classes, channels, tuple(label.names)))


def from_dataset(dataset) -> tuple[ArraySource, ArraySource, SourceInfo]:
  """An in-memory `Dataset` as sources (its train and test arrays, not copied)."""
  return (ArraySource(dataset.name, dataset.x_train, dataset.y_train),
          ArraySource(dataset.name, dataset.x_test, dataset.y_test),
          SourceInfo(dataset.name, dataset.num_classes, dataset.image_shape[-1],
                     tuple(dataset.class_names)))


class Subset:
  """The examples `rows` of another source (e.g. the sample the channel statistics use)."""

  def __init__(self, source, rows):
    self.source, self.rows = source, np.asarray(rows, np.int64)
    self.name = source.name

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.rows[index])]

  def describe(self, index: int) -> str:
    return self.source.describe(int(self.rows[index]))


def open_splits(name: str, data_dir: str | None = None):
  """(train source, test source, SourceInfo) for a dataset name as `load_dataset` takes it:
  'folder:<path>' and tfds datasets stream from their files; the rest ('mnist5k',
  'npz:<path>') are small and are loaded into memory first."""
  from cnnjax.data import load  # pylint: disable=g-import-not-at-top
  kind, sep, arg = name.partition(':')
  if sep and kind == 'folder' and arg:
    return open_folder(arg)
  if sep and kind == 'tfds' and arg:
    return open_tfds(arg, data_dir)
  if name in load.TFDS_DATASETS:
    return open_tfds(name, data_dir)
  return from_dataset(load.load_dataset(name, data_dir=data_dir))


def first_shape(train, channels: int) -> tuple[int, int, int]:
  """(H, W, C) of the first training image, as decoded to `channels`."""
  from cnnjax.data import transforms  # pylint: disable=g-import-not-at-top
  image = train[0]['image']
  if isinstance(image, np.ndarray):
    return tuple(image.shape) if image.ndim == 3 else (*image.shape, 1)
  try:
    return tuple(transforms.to_array(transforms.decode(image, channels)).shape)
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f'cannot read the image {train.describe(0)} ({type(e).__name__}: {e}); '
                    'replace or delete it.') from e
