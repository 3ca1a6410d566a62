"""Input pipelines side by side on the same generated JPEGs: decoded + augmented images/s.

  python benchmarks/data_pipeline.py                 # speed: cnnjax vs DataLoader vs tf.data
  python benchmarks/data_pipeline.py --memory        # RSS over one epoch of 20,000 JPEGs at 64 px
  python benchmarks/data_pipeline.py --memory --train   # the same epoch trained by runner.run
  python benchmarks/data_pipeline.py --feed          # a ResNet step fed by the pipeline vs not

Speed: the same folder of JPEGs (150-500 px, `--images` of them) through the same training
transform (random-resized crop, scale 0.08-1, ratio 3/4-4/3, bilinear antialiased, to `--size`;
horizontal flip; uint8 out, no normalization) with the same number of worker processes:
* cnnjax: `cnnjax.data.stream` (grain `mp_prefetch` workers decoding with PIL);
* torchvision: `ImageFolder` + `DataLoader(num_workers=W, shuffle=True)` with transforms v2
  `RandomResizedCrop(antialias=True)`, `RandomHorizontalFlip`, `PILToTensor`;
* tf.data through tfds' `ImageFolder` (where TensorFlow is installed): the flax ImageNet
  example's crop (`sample_distorted_bounding_box` + `decode_and_crop_jpeg`), bilinear
  antialiased resize, flip; `num_parallel_calls=W` on a private thread pool of W threads.
Each runs in its own process, `--repeat` times alternating; images/s is counted over
`--batches` batches after the first `--warmup` (worker start-up is reported separately).

Memory: one epoch of cnnjax's pipeline at `--size 64` over `--images 20000` JPEGs (decoded total
printed), each batch put on the device with `jax.device_put` (with `--train`: one epoch of
`runner.run` training a small convnet, evaluation and checkpoint included); RSS of the main
process and of the worker processes sampled every 0.2 s, and compared between the first and the
last 10% of the epoch's batches.
Feed: resnet18 train steps (64 px) fed by the pipeline vs on one batch already on the device.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.common import emit, parse  # noqa: E402

CLASSES = 10
DEFAULT_ROOT = pathlib.Path(os.environ.get('TMPDIR', '/tmp')) / 'cnnjax_bench_jpegs'


def _write_images(args):
  root, indices, seed, lo, hi = args
  from PIL import Image
  total = 0
  for i in indices:
    rng = np.random.default_rng([seed, i])
    h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # smooth, photo-like content
    pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
    path = root / 'train' / f'class{i % CLASSES:02d}' / f'{i:06d}.jpg'
    Image.fromarray(pixels).save(path, quality=90)
    total += h * w * 3
  return total


def make_folder(root: pathlib.Path, images: int, lo: int = 150, hi: int = 500,
                seed: int = 0) -> dict:
  """root/train/<class>/*.jpg (and a small test/ split), generated once and reused."""
  marker = root / 'generated.json'
  spec = {'images': images, 'px': [lo, hi], 'seed': seed}
  if marker.exists() and json.loads(marker.read_text())['spec'] == spec:
    return json.loads(marker.read_text())
  import multiprocessing
  for c in range(CLASSES):
    (root / 'train' / f'class{c:02d}').mkdir(parents=True, exist_ok=True)
    (root / 'test' / f'class{c:02d}').mkdir(parents=True, exist_ok=True)
  chunks = [(root, range(s, min(s + 500, images)), seed, lo, hi) for s in range(0, images, 500)]
  with multiprocessing.Pool(os.cpu_count()) as pool:
    decoded = sum(pool.map(_write_images, chunks))
  from PIL import Image
  for c in range(CLASSES):
    Image.new('RGB', (200, 160), (c * 20, 80, 160)).save(root / 'test' / f'class{c:02d}' / 'a.jpg')
  info = {'spec': spec, 'decoded_bytes': decoded,
          'disk_bytes': sum(p.stat().st_size for p in (root / 'train').rglob('*.jpg'))}
  marker.write_text(json.dumps(info))
  return info


# ------------------------------------------------------------------------------ workers


def _cnnjax_stream(root, size, workers, flip=True):
  from cnnjax.config import base_config
  from cnnjax.data import stream
  config = base_config().data
  config.name, config.image_size, config.workers, config.flip = f'folder:{root}', size, workers, flip
  config.mean, config.std = (128.0,) * 3, (64.0,) * 3  # fixed: no statistics pass
  return stream.open_stream(config)


def _time_batches(batches, warmup, count, batch):
  start = time.perf_counter()
  for _ in range(warmup):
    next(batches)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(count):
    next(batches)
  seconds = time.perf_counter() - start
  return {'images_per_second': count * batch / seconds, 'startup_seconds': first}


def worker_cnnjax(a):
  s = _cnnjax_stream(a.root, a.size, a.workers)
  n = len(s.train)
  batches = s.train_batches(a.batch, n // a.batch, seed=0, start_step=0,
                            total_steps=a.warmup + a.batches)
  result = _time_batches(iter(batches), a.warmup, a.batches, a.batch)
  batches.close()
  return result


def worker_torch(a):
  import torch
  from torchvision import datasets
  from torchvision.transforms import v2
  transform = v2.Compose([v2.RandomResizedCrop(a.size, antialias=True),
                          v2.RandomHorizontalFlip(), v2.PILToTensor()])
  dataset = datasets.ImageFolder(os.path.join(a.root, 'train'), transform=transform)
  loader = torch.utils.data.DataLoader(dataset, batch_size=a.batch, shuffle=True,
                                       num_workers=a.workers, drop_last=True,
                                       persistent_workers=a.workers > 0)

  def epochs():
    while True:
      yield from loader
  return _time_batches(epochs(), a.warmup, a.batches, a.batch)


def worker_tf(a):
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], 'GPU')
  builder = tfds.folder_dataset.ImageFolder(a.root)
  ds = builder.as_dataset(split='train', shuffle_files=True,
                          decoders={'image': tfds.decode.SkipDecoding()})
  size = a.size

  def preprocess(example):  # flax examples/imagenet input_pipeline.decode_and_random_crop
    data = example['image']
    shape = tf.io.extract_jpeg_shape(data)
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop)
    image = tf.io.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, [size, size], 'bilinear', antialias=True)
    image = tf.image.random_flip_left_right(image)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), example['label']

  options = tf.data.Options()
  options.threading.private_threadpool_size = a.workers
  ds = ds.with_options(options).shuffle(1024).repeat().map(
      preprocess, num_parallel_calls=a.workers).batch(a.batch, drop_remainder=True).prefetch(2)
  return _time_batches(iter(tfds.as_numpy(ds)), a.warmup, a.batches, a.batch)


def _rss_sampler(stop, samples):
  import psutil
  me = psutil.Process()
  while not stop.is_set():
    workers = 0
    for child in me.children(recursive=True):
      try:
        workers += child.memory_info().rss
      except psutil.Error:
        pass
    samples.append((time.perf_counter(), me.memory_info().rss, workers))
    stop.wait(0.2)


def worker_memory(a):
  """One epoch through the loader (each batch put on the device), or with --train through
  runner.run training a small convnet: RSS of this process and of its workers."""
  import jax
  samples, stop, marks = [], threading.Event(), []
  sampler = threading.Thread(target=_rss_sampler, args=(stop, samples), daemon=True)
  sampler.start()
  start = time.perf_counter()
  if a.train:
    import tempfile
    from cnnjax import config as config_lib, runner
    original = runner.data_loader.ahead

    def ahead(*args, **kwargs):  # marks when each training batch reaches the loop
      for item in original(*args, **kwargs):
        marks.append(time.perf_counter())
        yield item
    runner.data_loader.ahead = ahead
    config = config_lib.base_config()
    config.model.name, config.model.kwargs.widths = 'convnet', (8, 16, 16)
    config.data.name, config.data.image_size = f'folder:{a.root}', a.size
    config.data.workers, config.data.flip = a.workers, True
    config.data.mean, config.data.std = (128.0,) * 3, (64.0,) * 3
    config.train.batch_size, config.train.num_epochs = a.batch, 1
    config.train.progress_bar = False
    with tempfile.TemporaryDirectory() as workdir:
      runner.run(config, workdir)
  else:
    s = _cnnjax_stream(a.root, a.size, a.workers)
    steps = len(s.train) // a.batch
    with s.train_batches(a.batch, steps, seed=0, start_step=0, total_steps=steps) as batches:
      for batch in batches:
        jax.block_until_ready(jax.device_put(batch))
        marks.append(time.perf_counter())
  stop.set()
  sampler.join()
  steps = len(marks)

  def window(lo, hi):
    t0, t1 = marks[int(lo * (steps - 1))], marks[int(hi * (steps - 1))]
    rows = [(m, w) for t, m, w in samples if t0 <= t <= t1]
    return {'main_mib': round(max(m for m, _ in rows) / 2**20),
            'total_mib': round(max(m + w for m, w in rows) / 2**20)}
  return {'mode': 'runner.run, convnet' if a.train else 'loader + device_put',
          'images': steps * a.batch, 'seconds': round(marks[-1] - start, 1),
          'peak_main_mib': round(max(m for _, m, _ in samples) / 2**20),
          'peak_total_mib': round(max(m + w for _, m, w in samples) / 2**20),
          'first_10pct': window(0.0, 0.1), 'second_10pct': window(0.1, 0.2),
          'last_10pct': window(0.9, 1.0)}


def worker_feed(a):
  import jax
  from cnnjax import models, optim, parallel, train
  from cnnjax.config import base_config
  from cnnjax.data import loader
  s = _cnnjax_stream(a.root, a.size, a.workers)
  cfg = base_config()
  model = models.get_model('resnet18', num_classes=CLASSES)
  variables = train.init_variables(model, s.image_shape, jax.random.key(0))
  tx, _ = optim.make_optimizer(cfg.optimizer, cfg.schedule, 100, 100, variables['params'])
  strategy = parallel.DataParallel.create('jit')
  state = strategy.put_state(train.create_train_state(model, variables, tx, jax.random.key(1)))
  recipe = train.StepRecipe(mean=s.mean, std=s.std)
  steps = a.warmup + a.batches
  batches = s.train_batches(a.batch, len(s.train) // a.batch, 0, 0, 2 * steps + 1)
  fed = loader.ahead(batches, strategy.put_batch)
  device_batch, _ = next(fed)
  rates = {'device': [], 'fed': []}
  for name in ('device', 'fed', 'device', 'fed'):  # alternating windows
    for i in range(steps):
      if i == a.warmup:
        jax.block_until_ready(state.params)
        start = time.perf_counter()
      batch = device_batch if name == 'device' else next(fed)[0]
      state, _ = strategy.train_step(state, batch, recipe)
    jax.block_until_ready(state.params)
    rates[name].append(a.batches * a.batch / (time.perf_counter() - start))
  batches.close()
  return {'device_images_per_second': statistics.mean(rates['device']),
          'fed_images_per_second': statistics.mean(rates['fed'])}


WORKERS = {'cnnjax': worker_cnnjax, 'torch': worker_torch, 'tf': worker_tf,
           'memory': worker_memory, 'feed': worker_feed}


# ------------------------------------------------------------------------- orchestrator


def run(mode, a, timeout=3600):
  args = [sys.executable, __file__, '--worker', mode, '--root', str(a.root), '--size',
          str(a.size), '--workers', str(a.workers), '--batch', str(a.batch), '--batches',
          str(a.batches), '--warmup', str(a.warmup)] + ['--train'] * a.train
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
  if done.returncode:
    return {'error': done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}
  return parse(done.stdout)


def available(module):
  import importlib.util
  return importlib.util.find_spec(module) is not None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--worker', choices=sorted(WORKERS))
  p.add_argument('--memory', action='store_true')
  p.add_argument('--feed', action='store_true')
  p.add_argument('--train', action='store_true', help='--memory through runner.run')
  p.add_argument('--root', type=pathlib.Path, default=None)
  p.add_argument('--images', type=int, default=None)
  p.add_argument('--size', type=int, default=None)
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--batches', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--repeat', type=int, default=2)
  a = p.parse_args(argv)
  if a.worker:
    emit(WORKERS[a.worker](a))
    return 0
  a.images = a.images or (20000 if a.memory else 3000)
  a.size = a.size or (64 if a.memory or a.feed else 224)
  a.root = a.root or DEFAULT_ROOT.with_name(f'{DEFAULT_ROOT.name}_{a.images}')
  start = time.time()
  info = make_folder(a.root, a.images)
  print(f'{a.images} JPEGs 150-500 px in {a.root}: {info["disk_bytes"] / 2**20:.0f} MiB on '
        f'disk, {info["decoded_bytes"] / 2**30:.2f} GiB decoded (made in '
        f'{time.time() - start:.0f} s); load average {os.getloadavg()[0]:.2f}')
  if a.memory:
    a.batches = a.warmup = 0
    print(json.dumps(run('memory', a), indent=1))
    return 0
  if a.feed:
    print(json.dumps(run('feed', a), indent=1))
    return 0
  modes = ['cnnjax'] + ['torch'] * available('torchvision') + ['tf'] * available('tensorflow')
  runs = {m: [] for m in modes}
  for _ in range(a.repeat):
    for m in modes:
      runs[m].append(run(m, a))
      print(m, runs[m][-1], flush=True)
  print(f'\n{a.size} px, batch {a.batch}, {a.workers} workers, {a.batches} batches after '
        f'{a.warmup}; load average {os.getloadavg()[0]:.2f}\n')
  print('| pipeline | images/s (runs) | median | vs DataLoader | first batch |')
  print('|---|---|---|---|---|')
  ok = {m: [r for r in rs if 'error' not in r] for m, rs in runs.items()}
  base = statistics.median([r['images_per_second'] for r in ok.get('torch', [])] or [float('nan')])
  for m in modes:
    if not ok[m]:
      print(f'| {m} | failed: {runs[m][0]["error"]} | | | |')
      continue
    rates = [r['images_per_second'] for r in ok[m]]
    med = statistics.median(rates)
    print(f'| {m} | {", ".join(f"{r:.0f}" for r in rates)} | {med:.0f} | {med / base:.2f}x | '
          f'{statistics.median([r["startup_seconds"] for r in ok[m]]):.1f} s |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
