"""Streaming input: sources, the grain loader, multi-host rows, bad files, tfds array_record.

Everything reads data the tests generate: a tree of JPEGs (and a few PNGs) of varied sizes and
modes, mnist5k, and a tiny tfds dataset prepared in array_record format. Worker processes cost
seconds to start on 2 cores, so only the tests about workers use them.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cnnjax.config import base_config
from cnnjax.errors import ConfigError
from cnnjax.data import (DataError, batching, load_dataset, loader, sources, stream, train_batches,
                         transforms)

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLASSES = ('ant', 'bee', 'cow')


def write_tree(root, train_per_class=6, test_per_class=3, seed=0, modes=True):
  """root/{train,test}/<class>/*.jpg of sizes 20-90 px; with `modes`, one grayscale JPEG, one
  CMYK JPEG and one RGBA PNG among them. Returns {path: (label, RGB pixels as decoded)}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, per_class in (('train', train_per_class), ('test', test_per_class)):
    for label, cls in enumerate(CLASSES):
      os.makedirs(root / split / cls, exist_ok=True)
      for i in range(per_class):
        h, w = rng.integers(20, 90, 2)
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x * 3 % 256, y * 5 % 256, (x + y + 40 * label) % 256], -1)
        image = Image.fromarray(pixels.astype(np.uint8))
        name, fmt = f'{i:03d}.jpg', 'JPEG'
        if modes and split == 'train' and label == 1 and i < 3:
          image = image.convert(('L', 'CMYK', 'RGBA')[i])
          if image.mode == 'RGBA':
            name, fmt = f'{i:03d}.png', 'PNG'
        path = root / split / cls / name
        image.save(path, format=fmt, quality=90)
        with Image.open(path) as saved:
          written[str(path)] = (label, np.asarray(saved.convert('RGB')))
  return written


def data_config(name, **overrides):
  config = base_config().data
  config.name = name
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp('jpegs')
  return root, write_tree(root)


# ----------------------------------------------------------------- sources and transforms


def test_folder_source_lists_every_image_with_its_label(tree):
  root, written = tree
  train, test, info = sources.open_folder(str(root))
  assert info.class_names == CLASSES and info.num_classes == 3 and info.channels == 3
  assert len(train) == 18 and len(test) == 9
  for source in (train, test):
    for i in range(len(source)):
      label, _ = written[source.describe(i)]
      assert source[i]['label'] == label
  assert isinstance(train[0]['image'], bytes)  # encoded: decoding is the workers' job


def test_streamed_batches_are_cropped_resized_and_labelled(tree):
  root, written = tree
  s = stream.open_stream(data_config(f'folder:{root}', image_size=32, workers=1,
                                     mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0)))
  assert s.image_shape == (32, 32, 3) and s.mean == (1.0, 2.0, 3.0)
  batches = s.train_batches(batch_size=4, steps_per_epoch=4, seed=0, start_step=0,
                            total_steps=8)
  seen = []
  for step, batch in enumerate(batches):
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.uint8
    rows = batching.train_rows(len(s.train), 4, 4, 0, step)
    np.testing.assert_array_equal(batch['label'], s.train.labels[rows])
    seen.append(rows)
  epoch0 = np.concatenate(seen[:4])
  assert len(set(epoch0)) == 16  # an epoch visits distinct examples (18 % 4 dropped)
  # Evaluation: each test image once, resized and center-cropped exactly as EvalTransform does.
  passes = s.eval_batches(batch_size=4)
  evaluated = list(passes)
  passes.rewind()  # the next evaluation reuses the workers: the same batches again
  for again, first in zip(passes, evaluated, strict=True):
    np.testing.assert_array_equal(again['image'], first['image'])
  passes.close()
  assert [int(b['mask'].sum()) for b in evaluated] == [4, 4, 1]
  assert not evaluated[-1]['image'][1:].any()  # padding rows are zeros
  expected = transforms.EvalTransform(32, 3)(s.test[5]['image'])
  np.testing.assert_array_equal(evaluated[1]['image'][1], expected)


def test_stored_size_stream_equals_the_in_memory_batches_and_resumes_exactly():
  """mnist5k through the loader (2 workers, image_size 0) gives the fast path's batches, and
  grain's state resumes it mid-stream (with the same or another number of workers)."""
  ds = load_dataset('mnist5k')
  s = stream.open_stream(data_config('mnist5k', pipeline='stream', workers=2))
  assert (s.mean, s.std) == (ds.mean, ds.std) and s.image_shape == (28, 28, 1)
  steps = 62  # 4000 // 64
  reference = [b for epoch in (0, 1) for b in train_batches(ds.x_train, ds.y_train, 64, seed=3,
                                                              epoch=epoch)][60:66]
  batches = s.train_batches(64, steps, seed=3, start_step=60, total_steps=66)
  got = [next(batches), next(batches)]
  state = json.loads(json.dumps(batches.state()))  # what the checkpoint stores
  batches.close()
  assert state['next_step'] == 62 and state['workers'] == 2
  got += list(s.train_batches(64, steps, seed=3, start_step=62, total_steps=66, state=state))
  other_workers = stream.Stream(**{**s.__dict__, 'workers': 0})
  got_0 = list(other_workers.train_batches(64, steps, seed=3, start_step=64, total_steps=66,
                                           state=state | {'next_step': 64}))
  for g, r in zip(got + got_0, reference + reference[4:]):
    np.testing.assert_array_equal(g['image'], r['image'])
    np.testing.assert_array_equal(g['label'], r['label'])


def test_augmentation_depends_on_the_example_position_not_on_workers_or_processes(tree):
  root, _ = tree
  config = data_config(f'folder:{root}', image_size=24, mean=(0.,) * 3, std=(1.,) * 3)
  single = stream.open_stream(_with(config, workers=0))
  whole = list(single.train_batches(6, 3, seed=1, start_step=0, total_steps=3))
  halves = [list(stream.Stream(**{**single.__dict__, 'process_index': p, 'process_count': 2,
                                  'workers': 1}).train_batches(6, 3, seed=1, start_step=0,
                                                               total_steps=3))
            for p in (0, 1)]
  for step, batch in enumerate(whole):
    joined = {k: np.concatenate([halves[0][step][k], halves[1][step][k]]) for k in batch}
    np.testing.assert_array_equal(joined['image'], batch['image'])
    np.testing.assert_array_equal(joined['label'], batch['label'])


def _with(config, **values):
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in values.items():
    config[key] = value
  return config


def test_multi_host_rows_are_disjoint_and_cover_every_batch():
  n, batch, steps = 103, 12, 8   # 8 full batches per epoch, 7 examples dropped per epoch
  for step in range(2 * steps):
    parts = [batching.train_rows(n, batch, steps, 5, step, p, 3) for p in range(3)]
    whole = batching.train_rows(n, batch, steps, 5, step)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert len(set(np.concatenate(parts))) == batch
  for epoch in (0, 1):
    seen = np.concatenate([batching.train_rows(n, batch, steps, 5, epoch * steps + k)
                           for k in range(steps)])
    assert len(set(seen)) == steps * batch  # no example twice in an epoch
  evals = [np.concatenate([batching.eval_rows(n, 20, b, p, 2) for p in range(2)])
           for b in range(6)]
  real = np.concatenate(evals)
  np.testing.assert_array_equal(np.sort(real[real >= 0]), np.arange(n))  # each exactly once
  with pytest.raises(ConfigError, match='does not divide over 5 processes'):
    batching.train_rows(n, 12, steps, 0, 0, 0, 5)


def test_mean_and_std_are_estimated_on_a_fixed_sample_when_streaming_files(tree):
  root, _ = tree
  config = data_config(f'folder:{root}', image_size=16, workers=0)
  a, b = stream.open_stream(config), stream.open_stream(config)
  assert a.mean == b.mean and a.std == b.std and len(a.mean) == 3
  sample = np.concatenate([transforms.EvalTransform(16, 3)(a.train[i]['image'])[None]
                           for i in range(len(a.train))])
  np.testing.assert_allclose(a.mean, sample.reshape(-1, 3).mean(0), rtol=1e-6)
  with pytest.raises(ConfigError, match='data.mean and data.std'):
    stream.open_stream(_with(config, mean=(1.0,), std=(1.0,)))


def test_pipeline_choice_and_option_errors_name_the_key():
  assert not stream.use_stream(data_config('mnist5k'))
  assert stream.use_stream(data_config('mnist5k', image_size=32))
  assert stream.use_stream(data_config('mnist5k', pipeline='stream'))
  for config, key in ((data_config('x', pipeline='disk'), 'data.pipeline'),
                      (data_config('x', pipeline='memory', image_size=8), 'data.image_size')):
    with pytest.raises(ConfigError, match=key):
      stream.use_stream(config)
  with pytest.raises(ConfigError, match='data.workers'):
    stream.resolve_workers(-2)


# ------------------------------------------------------------------------------- bad input


def _corrupt(path):
  data = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(data[:len(data) // 3])  # a truncated JPEG


def test_a_corrupt_file_stops_the_stream_with_one_sentence_naming_it(tmp_path):
  write_tree(tmp_path, modes=False)
  bad = tmp_path / 'train' / 'bee' / '002.jpg'
  _corrupt(bad)
  s = stream.open_stream(data_config(f'folder:{tmp_path}', image_size=16, workers=1,
                                     mean=(0.,) * 3, std=(1.,) * 3))
  with pytest.raises(DataError) as e:  # raised in a worker process, arrives as itself
    list(s.train_batches(18, 1, seed=0, start_step=0, total_steps=1))
  message = str(e.value)
  assert str(bad) in message and 'data.skip_bad_images' in message and '\n' not in message


def test_skipping_bad_files_counts_them_and_keeps_batches_full(tmp_path):
  write_tree(tmp_path, modes=False)
  _corrupt(tmp_path / 'train' / 'ant' / '001.jpg')
  (tmp_path / 'test' / 'cow' / '000.jpg').write_bytes(b'not an image at all')
  s = stream.open_stream(data_config(f'folder:{tmp_path}', image_size=16, workers=0,
                                     skip_bad_images=True, mean=(0.,) * 3, std=(1.,) * 3))
  with pytest.warns(UserWarning, match=r'skipped 1 unreadable image.*ant/001.jpg'):
    batches = s.train_batches(18, 1, seed=0, start_step=0, total_steps=1)
    (batch,) = list(batches)
  assert batch['image'].shape == (18, 16, 16, 3) and batches.skipped == 1
  with pytest.warns(UserWarning, match='cow/000.jpg'):
    evaluated = list(s.eval_batches(9))
  assert int(evaluated[0]['mask'].sum()) == 8  # the unreadable test image is left out


def test_folder_layout_errors_and_warnings(tmp_path):
  write_tree(tmp_path, modes=False)
  os.makedirs(tmp_path / 'train' / 'dog')  # an empty class folder
  with pytest.raises(DataError, match=r'train/dog/ holds no images'):
    sources.open_folder(str(tmp_path))
  os.rmdir(tmp_path / 'train' / 'dog')
  for f in (tmp_path / 'test' / 'cow').iterdir():
    f.unlink()
  with pytest.warns(UserWarning, match=r'1 of 3 classes have no images in test/ \(cow\)'):
    sources.open_folder(str(tmp_path))
  os.makedirs(tmp_path / 'test' / 'elk')
  Image.new('RGB', (8, 8)).save(tmp_path / 'test' / 'elk' / 'x.jpg')
  with pytest.raises(DataError, match='test/ has class folders that train/ lacks: elk'):
    sources.open_folder(str(tmp_path))
  flat = tmp_path / 'flat'
  os.makedirs(flat / 'train' / 'a')
  Image.new('RGB', (8, 8)).save(flat / 'train' / 'a' / 'x.jpg')
  os.makedirs(flat / 'val')
  Image.new('RGB', (8, 8)).save(flat / 'val' / 'ILSVRC2012_val_00000001.JPEG')
  with pytest.raises(DataError, match=r'val/ holds images directly; sort them'):
    sources.open_folder(str(flat))


def test_grayscale_cmyk_and_rgba_files_are_converted_not_refused(tree):
  root, written = tree
  train, _, _ = sources.open_folder(str(root))
  modes = {}
  for i in range(len(train)):
    with Image.open(train.describe(i)) as image:
      modes[image.mode] = i
  assert {'L', 'CMYK', 'RGBA', 'RGB'} <= set(modes)
  for mode in ('L', 'CMYK', 'RGBA'):
    i = modes[mode]
    decoded = transforms.to_array(transforms.decode(train[i]['image'], 3))
    np.testing.assert_array_equal(decoded, written[train.describe(i)][1])


# --------------------------------------------------------------------- worker processes


_ORPHAN = """
import os, sys, time
from cnnjax.data import loader, sources, transforms
import numpy as np
src = sources.ArraySource('x', np.zeros((4000, 8, 8, 1), np.uint8), np.zeros(4000, np.int32))
b = loader.train_batches(src, transforms.StoredSize((8, 8, 1)), (8, 8, 1), batch_size=8,
                         steps_per_epoch=500, seed=0, start_step=0, total_steps=500, workers=2)
next(b)
import multiprocessing
print('WORKERS', ' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(600)
"""


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f'/proc/{pid}/stat') as f:
    return f.read().split()[2] != 'Z'


def test_workers_exit_when_the_training_process_is_killed():
  proc = subprocess.Popen([sys.executable, '-c', _ORPHAN], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  try:
    line = proc.stdout.readline()
    assert line.startswith('WORKERS'), line
    pids = [int(p) for p in line.split()[1:]]
    assert pids and all(_alive(p) for p in pids)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  deadline = time.time() + 30
  while time.time() < deadline and any(_alive(p) for p in pids):
    time.sleep(0.2)
  assert not any(_alive(p) for p in pids), pids


def test_a_script_without_a_main_guard_fails_fast_instead_of_hanging(tmp_path, tree):
  """Workers are spawned and re-import the script that started them: unguarded code there is
  Python's usual error (naming `if __name__ == '__main__':`), and the parent stops with it."""
  root, _ = tree
  script = tmp_path / 'unguarded.py'
  script.write_text(
      'from cnnjax.config import base_config\nfrom cnnjax.data import stream\n'
      'c = base_config().data\n'
      f'c.name, c.image_size, c.workers = "folder:{root}", 16, 2\n'
      'c.mean, c.std = (1.,) * 3, (1.,) * 3\n'
      'print(sum(1 for _ in stream.open_stream(c).train_batches(4, 4, 0, 0, 4)))\n')
  done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert done.returncode != 0
  assert "if __name__ == '__main__':" in done.stderr


# ----------------------------------------------------------------- tfds in array_record

_BUILD = """
import sys
import numpy as np
import tensorflow_datasets as tfds

class CnnjaxTinyPhotos(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(names=['ant', 'bee'])}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(10, 0), 'validation': self._generate_examples(4, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = rng.integers(20, 70, 2)
      yield i, {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': i % 2}

for root, file_format in zip(sys.argv[1:], ('array_record', 'tfrecord')):
  CnnjaxTinyPhotos(data_dir=root, file_format=file_format).download_and_prepare()
"""

_READ_WITHOUT_TF = """
import importlib.machinery, json, sys
_find = importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):  # as if TensorFlow were not installed
  return None if name.split('.')[0] == 'tensorflow' else _find(name, path, target)
importlib.machinery.PathFinder.find_spec = find_spec
from cnnjax.config import base_config
from cnnjax.data import stream
from cnnjax.errors import DataError
config = base_config().data
config.name, config.data_dir, config.image_size, config.workers = (
    'tfds:cnnjax_tiny_photos', sys.argv[1], 24, 1)
s = stream.open_stream(config)
train = list(s.train_batches(4, 2, seed=0, start_step=0, total_steps=3))
evaluated = list(s.eval_batches(3))
config.data_dir = sys.argv[2]
try:
  stream.open_stream(config)
  refused = ''
except DataError as e:
  refused = str(e)
print('RESULT ' + json.dumps({
    'tensorflow': 'tensorflow' in sys.modules, 'name': s.name, 'classes': s.class_names,
    'sizes': [len(s.train), len(s.test)], 'shapes': [list(b['image'].shape) for b in train],
    'labels': [b['label'].tolist() for b in train],
    'records': [s.train[i]['label'] for i in range(len(s.train))], 'masks': [int(b['mask'].sum()) for b in evaluated],
    'refused': refused}))
"""


def test_a_tfds_dataset_in_array_record_streams_without_tensorflow(tmp_path):
  pytest.importorskip('tensorflow')  # preparing needs it (the test extra has it), reading not
  array_record, tfrecord = tmp_path / 'array_record', tmp_path / 'tfrecord'
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  built = subprocess.run([sys.executable, '-c', _BUILD, str(array_record), str(tfrecord)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert built.returncode == 0, built.stderr[-3000:]
  read = subprocess.run([sys.executable, '-c', _READ_WITHOUT_TF, str(array_record),
                         str(tfrecord)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert read.returncode == 0, read.stderr[-3000:]
  result = json.loads(read.stdout.split('RESULT ')[1])
  assert not result['tensorflow']
  assert result['name'] == 'tfds:cnnjax_tiny_photos' and result['classes'] == ['ant', 'bee']
  assert result['sizes'] == [10, 4] and result['shapes'] == [[4, 24, 24, 3]] * 3
  labels = np.asarray(result['records'])  # tfds shuffles the examples when it prepares them
  assert sorted(labels) == [0] * 5 + [1] * 5
  for step, got in enumerate(result['labels']):
    np.testing.assert_array_equal(got, labels[batching.train_rows(10, 4, 2, 0, step)])
  assert result['masks'] == [3, 1]
  refused = result['refused']
  assert 'prepared as tfrecord' in refused and "file_format='array_record'" in refused
  assert str(tfrecord) in refused
