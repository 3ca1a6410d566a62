"""Data for cnnjax: whole datasets in host memory, batches, and on-device augmentation.

  ds = load_dataset('mnist5k')            # or 'cifar10', 'npz:<path>', 'folder:<path>', ...
  for batch in train_batches(ds.x_train, ds.y_train, 64, seed=0, epoch=0): ...
  images = augment.normalize(augment.apply(rng, batch['image'], 4, 'reflect', True),
                             ds.mean, ds.std)                  # inside the jitted step

TensorFlow is imported only when a tfds or folder dataset is read, so `import cnnjax.data` is
fast and never touches an accelerator.
"""
from cnnjax.data import augment
from cnnjax.data.batching import (epoch_permutation, eval_batches, num_eval_batches,
                                  steps_per_epoch, train_batches)
from cnnjax.data.dataset import DataError, Dataset, channel_stats
from cnnjax.data.load import NAMES, TFDS_DATASETS, load_dataset

__all__ = [
    'augment', 'DataError', 'Dataset', 'channel_stats', 'load_dataset', 'NAMES',
    'TFDS_DATASETS', 'train_batches', 'eval_batches', 'steps_per_epoch', 'num_eval_batches',
    'epoch_permutation',
]
