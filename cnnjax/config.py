"""Experiment configs: the shared defaults, loading `experiments/<name>.py`, typed CLI overrides.

An experiment is a file in `experiments/` whose `get_config()` returns an
`ml_collections.ConfigDict` built on `base_config()`. Every field can be overridden from the
command line as `--config.optimizer.lr=0.05`; the value is parsed as the type of the default,
and an unknown key or a value of the wrong type is a `ConfigError` that names the key.
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Any, Iterable

import ml_collections

from cnnjax.errors import ConfigError  # noqa: F401  (re-exported: raised here)

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'experiments'



def base_config() -> ml_collections.ConfigDict:
  """Every field any experiment may set, with its default and therefore its type."""
  from cnnjax import optim, schedules  # late import: they pull in optax

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      name='convnet',
      dtype='float32',          # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  ))
  c.model.kwargs = ml_collections.ConfigDict()  # architecture options of the chosen model
  c.data = ml_collections.ConfigDict(dict(
      name='mnist5k',           # mnist5k | mnist | fashion_mnist | cifar10 | cifar100 | svhn_cropped | npz:<path> | folder:<path> | tfds:<name>
      data_dir='',              # tfds data dir ('' = TFDS_DATA_DIR or ~/tensorflow_datasets)
      classes=(),               # keep only these labels (relabelled 0..k-1); () = all
      crop_padding=0,           # random crop after padding by this many pixels (0 = off)
      pad_mode='constant',      # 'constant' (zeros) or 'reflect'
      flip=False,               # random horizontal flip (on the device; streamed with image_size > 0: on the host)
      # On the device, on in-memory and streamed data alike (cnnjax/data/autoaugment.py, augment.py, mixing.py):
      randaugment=(),           # (num_ops, magnitude), e.g. (2, 9): torchvision's RandAugment (31 bins) after crop + flip; () = off
      trivialaugment=False,     # torchvision's TrivialAugmentWide after crop + flip
      random_erasing=0.0,       # probability per image of torchvision's RandomErasing (after normalization)
      random_erasing_mode='zero',  # 'zero' (torchvision's value=0) | 'pixel' (timm's per-pixel N(0, 1))
      mixup_alpha=0.0,          # > 0: mixup, lambda ~ Beta(a, a), one per batch as timm's Mixup (targets mixed too)
      cutmix_alpha=0.0,         # > 0: cutmix, lambda ~ Beta(a, a); both > 0: one of the two per batch
      mix_prob=1.0,             # probability that a batch is mixed at all (timm's prob)
      mix_switch_prob=0.5,      # with both alphas: probability of cutmix instead of mixup (timm's switch_prob)
      # Streaming (cnnjax/data/stream.py): datasets read batch by batch by grain workers.
      pipeline='auto',          # 'memory' (whole splits in memory, augmented on the device) | 'stream' | 'auto' = stream when image_size > 0
      image_size=0,             # > 0: train on random-resized crops of image_size^2, test on resize + center crop; 0 = images as stored
      crop_scale=(0.08, 1.0),   # random-resized crop: range of its fraction of the image area
      crop_ratio=(3 / 4, 4 / 3),  # ... and of its aspect ratio (width / height)
      eval_crop_fraction=0.875,  # test: resize the short side to image_size / this, then center-crop image_size
      mean=(),                  # per-channel normalization in [0, 255] units; () = from the training images
      std=(),                   #   (streamed from files: estimated on a fixed sample of 1,000 of them)
      workers=-1,               # streaming: worker processes that read, decode and augment (-1 = one per core, at most 16; 0 = none)
      prefetch=2,               # streaming: batches each worker keeps ready
      skip_bad_images=False,    # unreadable image files: skip them with a counted warning instead of stopping
  ))
  c.optimizer = optim.default_optimizer_config()
  c.schedule = schedules.default_schedule_config()
  c.train = ml_collections.ConfigDict(dict(
      batch_size=128,           # global batch, split over all devices
      num_epochs=10,
      num_steps=0,              # > 0: stop after this many steps instead of num_epochs
      eval_batch_size=500,
      eval_every_steps=0,       # 0 = evaluate at the end of every epoch
      label_smoothing=0.0,
      eval_flip_tta=False,      # evaluate on the mean logits of each test image and its mirror
      accumulate_steps=1,       # > 1: each step's batch runs as this many micro-batches (cnnjax/train.py)
      ema_decay=0.0,            # > 0: keep, evaluate and checkpoint a moving average of the weights (cnnjax/ema.py)
      ema_warmup_power=0.0,     # > 0: timm ModelEmaV3's decay warmup with this power (2/3 or 3/4)
      aux_loss_weight=0.4,      # loss += this x each auxiliary head's loss (inception_v3's AuxLogits; torchvision's 0.4)
      log_every_steps=50,
      progress_bar=True,
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=0,            # 0 = only at the end of each epoch
      keep=3,                   # newest checkpoints kept (the best one is kept too)
      best_metric='test_accuracy',
  ))
  c.transfer = ml_collections.ConfigDict(dict(
      init_from='',             # a cnnjax workdir/checkpoint dir, or a torchvision .pth/.safetensors file
      exclude=(),               # param path patterns not loaded (re-initialized), e.g. ('fc',)
  ))
  c.parallel = ml_collections.ConfigDict(dict(
      mode='jit',               # 'jit' (mesh + sharded batch) or 'pmap'
      coordinator_address='',   # multi-host: 'host:port' ('' = auto-detect or single host)
      num_processes=0,
      process_id=-1,
  ))
  return c


def merge_defaults(cfg: Any, defaults: ml_collections.ConfigDict, what: str) -> ml_collections.ConfigDict:
  """Defaults overridden by ``cfg`` (a ConfigDict, a dict or None); unknown keys are errors."""
  items = {} if cfg is None else (cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))
  for key, value in items.items():
    if key not in defaults:
      raise ConfigError(f'Unknown {what} config key {key!r}; valid keys: {", ".join(sorted(defaults))}.')
    try:
      defaults[key] = value
    except TypeError:
      raise ConfigError(f'{what} config key {key!r} must be of type '
                      f'{type(defaults[key]).__name__}, got {value!r}.') from None
  return defaults


def check_choice(value: str, choices: Iterable[str], what: str) -> None:
  if value not in choices:
    raise ConfigError(f'Unknown {what} {value!r}; valid names: {", ".join(choices)}.')


def experiment_names() -> list[str]:
  return sorted(p.stem for p in EXPERIMENTS_DIR.glob('*.py') if not p.stem.startswith('_'))


def experiment_summary(name: str) -> str:
  """The first line of an experiment file's docstring."""
  module = _load_module(name)
  return (module.__doc__ or '').strip().splitlines()[0] if module.__doc__ else ''


def _load_module(name: str):
  path = pathlib.Path(name)
  if path.suffix != '.py':
    path = EXPERIMENTS_DIR / f'{name}.py'
  if not path.is_file():
    raise ConfigError(f"unknown experiment '{name}'; choose one of: {', '.join(experiment_names())}.")
  spec = importlib.util.spec_from_file_location(f'cnnjax_experiment_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'experiment file {path} has no get_config() function.')
  return module


def experiment_main(name: str):
  """The experiment's own `main(config, workdir)` for multi-stage experiments (e.g. a pretrain
  and a fine-tune run), or None for the usual single-run experiment."""
  return getattr(_load_module(name), 'main', None)


def load_experiment(name: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`get_config()` of `experiments/<name>.py` (or a path to such a file), with overrides applied.

  Overrides are 'optimizer.lr=0.05' strings (a leading '--config.' is accepted too).
  """
  config = _load_module(name).get_config()
  config.experiment = pathlib.Path(name).stem
  apply_overrides(config, overrides)
  return config


WORKDIR = '<workdir>'  # in data.name: the run's workdir (a recipe that writes its own data there)


def resolve_workdir(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
  """Replaces `WORKDIR` in `data.name` by the run's workdir, for every mode of run.py (training,
  --visualize, --export read the same data)."""
  config.data.name = str(config.data.name).replace(WORKDIR, str(workdir))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  parsed = []
  for item in overrides:
    item = item.removeprefix('--').removeprefix('config.')
    if '=' not in item:
      raise ConfigError(f"config override '{item}' must look like --config.key=value.")
    parsed.append(item.split('=', 1))
  # Model options last: they are checked against the model, which an override may choose.
  for key, text in sorted(parsed, key=lambda kv: kv[0].startswith(MODEL_KWARGS)):
    if key.startswith(MODEL_KWARGS):
      set_model_option(config, key, text)
    else:
      set_value(config, key, text)


MODEL_KWARGS = 'model.kwargs.'
SET_BY_THE_RUN = ('num_classes', 'in_channels', 'dtype', 'bn_axis_name')  # from data/config


def set_model_option(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `model.kwargs.<option>` for an option the chosen model accepts, parsed as the type of
  its default (or of the value the experiment file set)."""
  from cnnjax import models  # late import: it pulls in JAX
  option = key.removeprefix(MODEL_KWARGS)
  name = config.model.name
  defaults = {k: v for k, v in models.model_options(name).items() if k not in SET_BY_THE_RUN}
  if option not in defaults:
    why = ' (it comes from the data and model.dtype)' if option in SET_BY_THE_RUN else ''
    raise ConfigError(f"model '{name}' has no option '{option}' to set as {key}{why}; its "
                      f"options: {', '.join(sorted(defaults)) or 'none'}.")
  current = config.model.kwargs.get(option, defaults[option])
  if isinstance(current, (bool, int, float, str, tuple, list)):
    value = _parse(key, text, current)
  else:  # no default, None, or a class: any Python literal
    value = _literal(text)
  try:
    config.model.kwargs[option] = value
  except TypeError:
    raise ConfigError(f"config key '{key}' expects a {type(current).__name__}, got '{text}'.") from None


def set_value(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets dotted `key` from its string form, parsed as the type of the current value."""
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise _unknown_key(key, '.'.join(parents[:i]), node)
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise _unknown_key(key, '.'.join(parents), node)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config key '{key}' is a group; set one of its fields: {', '.join(sorted(current))}.")
  node[leaf] = _parse(key, text, current)


def _unknown_key(key, parent, node) -> ConfigError:
  valid = ', '.join(sorted(node)) if isinstance(node, ml_collections.ConfigDict) else ''
  where = f" in '{parent}'" if parent else ''
  return ConfigError(f"unknown config key '{key}'; valid keys{where}: {valid}.")


def _parse(key: str, text: str, current):
  expected = type(current).__name__
  expected = ('an ' if expected[0] in 'aeiou' else 'a ') + expected
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered not in ('true', 'false', '1', '0'):
        raise ValueError
      return lowered in ('true', '1')
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = _literal(text) if text.strip() else ()
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return type(current)(value)
    return _literal(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"config key '{key}' expects {expected}, got '{text}'.") from None


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if ',' in text:
      return tuple(part.strip() for part in text.split(','))
    return text
