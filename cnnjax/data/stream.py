"""A dataset read batch by batch from its files (`Stream`): what the loop uses when data does
not fit in memory, or when images need host-side cropping and resizing.

`open_stream(config.data)` opens the train and test sources (`cnnjax.data.sources`), picks the
transforms (`data.image_size > 0`: random-resized crop + flip for training, resize + center crop
for evaluation; 0: images used at their stored, common size and augmented on the device as the
in-memory path does), and fixes the per-channel mean and std that normalization uses on the
device (`data.mean`/`data.std`, else exact for in-memory arrays, else estimated on a fixed sample
of training images). Batches come from the one grain loader (`cnnjax.data.loader`).

`use_stream(config.data)` decides between this and the in-memory fast path: `data.pipeline`
'stream' or 'memory', or 'auto' = stream exactly when `data.image_size > 0`.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from cnnjax.data import loader, sources, transforms
from cnnjax.data.dataset import channel_stats
from cnnjax.errors import ConfigError

PIPELINES = ('auto', 'memory', 'stream')
STATS_SAMPLE = 1000      # training images the mean/std estimate reads (evenly spaced, fixed)
MAX_AUTO_WORKERS = 16


def use_stream(data_config: ml_collections.ConfigDict) -> bool:
  pipeline = data_config.pipeline
  if pipeline not in PIPELINES:
    raise ConfigError(f"data.pipeline must be one of {', '.join(PIPELINES)}, got '{pipeline}'.")
  if pipeline == 'memory' and data_config.image_size:
    raise ConfigError('data.image_size crops and resizes images while streaming; set '
                      'data.pipeline=stream (or auto), or data.image_size=0.')
  return pipeline == 'stream' or (pipeline == 'auto' and data_config.image_size > 0)


def resolve_workers(workers: int) -> int:
  """data.workers: -1 = one per CPU core (at most 16), 0 = no worker processes."""
  if workers < -1:
    raise ConfigError(f'data.workers must be >= -1, got {workers}.')
  return min(os.cpu_count() or 1, MAX_AUTO_WORKERS) if workers == -1 else workers


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
  """Train and test splits read from their sources on demand, for one process of the run."""
  name: str
  train: object                 # random-access sources (cnnjax.data.sources)
  test: object
  info: sources.SourceInfo
  image_shape: tuple[int, int, int]
  train_transform: object
  eval_transform: object
  mean: tuple[float, ...]
  std: tuple[float, ...]
  workers: int = 0
  buffer: int = 2
  skip_bad: bool = False
  process_index: int = 0
  process_count: int = 1

  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.info.class_names

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def num_test(self) -> int:
    return len(self.test)

  @property
  def flips_on_host(self) -> bool:
    """Whether training images are mirrored here (with the crop) instead of on the device."""
    return isinstance(self.train_transform, transforms.TrainTransform) and \
        self.train_transform.flip

  def describe(self) -> str:
    h, w, c = self.image_shape
    return (f'data: {self.name} {len(self.train)} train / {len(self.test)} test, streamed as '
            f'{h}x{w}x{c} by {self.workers} worker(s), {self.num_classes} classes')

  def train_batches(self, batch_size: int, steps_per_epoch: int, seed: int, start_step: int,
                    total_steps: int, state: dict | None = None) -> loader.Batches:
    return loader.train_batches(
        self.train, self.train_transform, self.image_shape, batch_size=batch_size,
        steps_per_epoch=steps_per_epoch, seed=seed, start_step=start_step,
        total_steps=total_steps, workers=self.workers, buffer=self.buffer,
        skip_bad=self.skip_bad, process_index=self.process_index,
        process_count=self.process_count, state=state)

  def eval_batches(self, batch_size: int) -> loader.Batches:
    return loader.eval_batches(
        self.test, self.eval_transform, self.image_shape, batch_size=batch_size,
        workers=self.workers, buffer=self.buffer, skip_bad=self.skip_bad,
        process_index=self.process_index, process_count=self.process_count)

  def test_image(self, index: int) -> tuple[np.ndarray, int]:
    """(uint8 image (H, W, C), label) of test example `index`, as evaluation sees it."""
    example = self.test[int(index)]
    return self.eval_transform(example['image']), int(example['label'])

  def sample_images(self, count: int = STATS_SAMPLE) -> np.ndarray:
    """Up to `count` evenly spaced training images through the eval transform (fixed)."""
    return sample_images(self.train, self.eval_transform, self.image_shape, count,
                         self.workers, self.skip_bad)


def sample_images(source, transform, image_shape, count: int, workers: int,
                  skip_bad: bool) -> np.ndarray:
  rows = np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).astype(np.int64))
  return loader.read_split(sources.Subset(source, rows), transform, image_shape, workers,
                           skip_bad=skip_bad)[0]


def _stats(data_config, train, transform, shape, workers, skip_bad):
  channels = shape[-1]
  mean, std = tuple(data_config.mean), tuple(data_config.std)
  if bool(mean) != bool(std) or (mean and (len(mean) != channels or len(std) != channels)):
    raise ConfigError(f'data.mean and data.std must both be set, with {channels} value(s) each '
                      f'(one per channel, in [0, 255] units), got {mean} and {std}.')
  if mean:
    return tuple(map(float, mean)), tuple(map(float, std))
  if isinstance(train, sources.ArraySource) and isinstance(transform, transforms.StoredSize):
    return channel_stats(train.images)  # exactly what the in-memory path computes
  return channel_stats(sample_images(train, transform, shape, STATS_SAMPLE, workers, skip_bad))


def open_stream(data_config: ml_collections.ConfigDict, process_index: int = 0,
                process_count: int = 1) -> Stream:
  """The Stream `config.data` describes, for process `process_index` of `process_count`."""
  size = int(data_config.image_size)
  transforms.check_options(size, data_config.crop_scale, data_config.crop_ratio,
                           data_config.eval_crop_fraction)
  workers = resolve_workers(data_config.workers)
  if data_config.prefetch < 1:
    raise ConfigError(f'data.prefetch must be >= 1, got {data_config.prefetch}.')
  train, test, info = sources.open_splits(data_config.name, data_config.data_dir or None)
  if data_config.classes:
    raise ConfigError('data.classes selects classes of in-memory datasets only; use '
                      'data.pipeline=memory, or a folder holding just those classes.')
  if size:
    shape = (size, size, info.channels)
    train_t = transforms.TrainTransform(size, info.channels, tuple(data_config.crop_scale),
                                        tuple(data_config.crop_ratio), bool(data_config.flip))
    eval_t = transforms.EvalTransform(size, info.channels, data_config.eval_crop_fraction)
  else:
    shape = sources.first_shape(train, info.channels)
    train_t = eval_t = transforms.StoredSize(shape)
  mean, std = _stats(data_config, train, eval_t, shape, workers, data_config.skip_bad_images)
  return Stream(name=info.name, train=train, test=test, info=info, image_shape=shape,
                train_transform=train_t, eval_transform=eval_t, mean=mean, std=std,
                workers=workers, buffer=int(data_config.prefetch),
                skip_bad=bool(data_config.skip_bad_images), process_index=process_index,
                process_count=process_count)
