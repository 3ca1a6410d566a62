"""tensorflow-datasets: whole train/test splits of a prepared tfds dataset into host memory.

Offline is the normal case on clusters (and on the machine this was written on). tfds itself
would retry a failing download for minutes and end in a traceback, so before any download we
check whether the dataset is prepared under the data dir and, if not, whether the download host
answers within a few seconds; if it does not, `DataError` says where we looked and how to
provide the data.

TensorFlow is imported only here (and in `folder.py`), lazily, and is told to see no GPU or
TPU, so it never takes an accelerator from JAX.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
from typing import Iterable

import numpy as np

from cnnjax.data.dataset import DataError, Dataset

# Where each built-in dataset's tfds builder downloads from (see the tfds sources).
DOWNLOAD_URLS = {
    'mnist': 'https://storage.googleapis.com/cvdf-datasets/mnist/',
    'fashion_mnist': 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
    'cifar10': 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz',
    'cifar100': 'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz',
    'svhn_cropped': 'http://ufldl.stanford.edu/housenumbers/',
}
FALLBACK_URL = 'https://storage.googleapis.com/'  # for other tfds datasets: Google's storage
PROBE_TIMEOUT_S = 4.0


def import_tf():
  """Imports TensorFlow for tfds, hiding every GPU/TPU from it; DataError if it is missing."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError('Reading tensorflow-datasets data needs TensorFlow: pip install '
                    "'cnnjax[tf]' (or pip install tensorflow-cpu).") from e
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # TF already initialized its devices (we hid them then) or knows no such kind.
  return tf


def import_tfds():
  """Imports tensorflow_datasets, which imports TensorFlow only when it reads or prepares.

  Call `import_tf` before reading or preparing so TensorFlow's devices are hidden first.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError('Loading tfds datasets needs tensorflow-datasets: '
                    'pip install tensorflow-datasets.') from e
  return tfds


def resolve_data_dir(data_dir: str | None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds' default), absolute."""
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.abspath(os.path.expanduser(data_dir))


def _host_port(url: str) -> tuple[str, int]:
  parts = urllib.parse.urlsplit(url)
  return parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80)


def reachable(urls: Iterable[str], timeout: float = PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to every URL's host opens within `timeout` seconds overall.

  Name resolution has no timeout of its own, so each probe runs in a daemon thread and we
  stop waiting at the deadline.
  """
  targets = sorted({_host_port(u) for u in urls})
  results = {}

  def probe(target):
    try:
      socket.create_connection(target, timeout=timeout).close()
      results[target] = True
    except OSError:
      results[target] = False

  threads = [threading.Thread(target=probe, args=(t,), daemon=True) for t in targets]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout)  # threads run in parallel: the total wait stays about `timeout`
  return all(results.get(t, False) for t in targets)


def _download_urls(name: str, builder) -> list[str]:
  if name in DOWNLOAD_URLS:
    return [DOWNLOAD_URLS[name]]
  try:
    urls = list(builder.url_infos or ())
  except Exception:  # pylint: disable=broad-except  # some tfds versions fail here offline
    urls = []
  return urls or [FALLBACK_URL]


def _not_available(name: str, data_dir: str, builder, urls: list[str]) -> DataError:
  hosts = ', '.join(sorted({_host_port(u)[0] for u in urls}))
  return DataError(
      f'Dataset {name} is not prepared in {data_dir} (looked for {builder.data_dir}) and '
      f'{hosts} cannot be reached to download it: on a machine with internet run '
      f'`python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\', '
      f'data_dir=\'{data_dir}\').download_and_prepare()"` and copy that folder here, or point '
      f'TFDS_DATA_DIR (or data_dir) at a folder that holds it.')


@contextlib.contextmanager
def quiet_absl():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)


def prepared_builder(name: str, data_dir: str | None = None, download: bool = True):
  """The tfds builder of `name` under the resolved data dir, downloading only when reachable."""
  tfds = import_tfds()
  data_dir = resolve_data_dir(data_dir)
  try:
    with quiet_absl():  # "Variant folder ... has no dataset_info.json" is our error's job
      builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'tensorflow-datasets has no dataset named {name!r}.') from e
  except (ValueError, AssertionError) as e:  # a bad config or version in the name
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'tensorflow-datasets cannot build {name!r}: {first_line}') from e
  with quiet_absl():
    if builder.is_prepared():
      return builder
  urls = _download_urls(name, builder)
  if not download or not reachable(urls):
    raise _not_available(name, data_dir, builder, urls)
  import_tf()
  builder.download_and_prepare()
  return builder


def load(name: str, data_dir: str | None = None, download: bool = True,
         display_name: str | None = None) -> Dataset:
  """Loads the train and test splits of tfds dataset `name` as uint8 NHWC arrays.

  Args:
    name: a tfds name, e.g. 'cifar10' or 'emnist/digits'.
    data_dir: the tfds data dir; default $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    download: allow downloading and preparing a dataset that is not prepared yet.
    display_name: the Dataset's name (default `name`).
  """
  builder = prepared_builder(name, data_dir, download)
  tfds = import_tfds()
  import_tf()
  info = builder.info
  if info.supervised_keys is None or 'label' not in info.features:
    raise DataError(f'tfds dataset {name} has no (image, label) pairs to classify.')
  missing = [s for s in ('train', 'test') if s not in info.splits]
  if missing:
    raise DataError(f'tfds dataset {name} has no {"/".join(missing)} split (it has '
                    f'{sorted(info.splits)}).')
  arrays = {}
  for split in ('train', 'test'):
    images, labels = tfds.as_numpy(
        builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
    arrays[split] = (np.asarray(images), np.asarray(labels))
  label = info.features['label']
  return Dataset.from_arrays(display_name or name, *arrays['train'], *arrays['test'],
                             num_classes=label.num_classes,
                             class_names=list(label.names))
