"""Optimizers, weight-decay masks and freezing, all built from config (schedules: `cnnjax.schedules`).

Everything here is assembled from Optax pieces; the config (``ml_collections.ConfigDict``) is the
only input. ``make_optimizer`` returns an ``optax.GradientTransformation`` plus the schedule (for
logging); schedules are stepped once per optimizer step, epoch-valued fields are converted with
``steps_per_epoch`` (rounded to whole steps) and count from the start of training.

Parameter paths and patterns
  A parameter's path joins its keys in the ``params`` collection with '/', e.g.
  ``layer1_0/conv1/conv/kernel``, ``layer1_0/bn1/scale``, ``fc/dense/bias``. A pattern is a
  regular expression that must match a whole path or a whole prefix of it ending at a '/': 'fc'
  selects every parameter under module ``fc``, 'layer[12]_.*' everything in layer1 and layer2,
  '.*/kernel' every kernel. A pattern that matches no parameter is an error (it is a typo).

Weight decay (``weight_decay_mode``)
  'coupled' adds ``weight_decay * param`` to the gradient before momentum/Adam, exactly like
  ``torch.optim.SGD`` / ``torch.optim.Adam``; 'decoupled' adds it to the final direction, scaled by
  the learning rate, exactly like ``torch.optim.AdamW`` (SGD + decoupled is SGDW). 'auto' picks
  coupled for sgd/adam and decoupled for adamw. ``decay_bn_and_bias=False`` exempts (see
  ``weight_decay_mask``) every parameter named ``bias`` or ``scale`` and every parameter of a
  normalization module, i.e. a module whose name starts with 'bn' or contains '_bn' or 'norm'
  (case-insensitive: bn1, downsample_bn, BatchNorm_0, LayerNorm_0).

Fine-tuning
  ``frozen`` patterns (or ``trainable`` patterns: everything else is frozen) get exactly zero
  updates and no optimizer state (``optax.partition`` routes them to ``optax.set_to_zero``). The
  train step should also stop their gradients, using ``frozen_mask`` / ``untrained_mask``, so no
  gradient is computed for them. ``lr_multipliers`` ('pattern=factor', first match wins) scale the
  final update of matching parameters: the discriminative learning rates of torch param groups.

Gradual unfreezing (``unfreeze_after_epochs`` > 0)
  The parameters selected by ``frozen``/``trainable`` get no updates for that many epochs; after
  that they train too, and every learning rate is multiplied by ``unfrozen_lr_factor``. A pure
  jitted train step cannot change the optimizer state's structure, so the design keeps everything
  in one transformation: the late group runs its own copy of the optimizer inside
  ``optax.conditionally_mask``, whose inner state (momentum, Adam moments and count) stays at its
  initial value and whose updates are zero until the step count reaches the boundary. Its
  optimizer thus starts fresh at unfreezing, like a torch param group added at that moment, and its
  schedule is shifted so it sees the same learning rate as the rest. During the frozen phase the
  late group's gradients are computed (the same compiled step serves both phases) unless the loop
  recompiles at step ``unfreeze_step(opt_cfg, steps_per_epoch)`` with
  ``untrained_mask(opt_cfg, params, step, steps_per_epoch)``; the optimizer state is the same in
  both phases, so that is safe. Global-norm clipping sees only the parameters that
  are being trained at that step.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cnnjax.config import check_choice, merge_defaults
from cnnjax.errors import ConfigError
from cnnjax.schedules import make_schedule

OPTIMIZERS = ('sgd', 'adam', 'adamw')
WEIGHT_DECAY_MODES = ('auto', 'coupled', 'decoupled')
_NORM_MODULE = re.compile(r'^bn|_bn|norm', re.IGNORECASE)


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Every optimizer field with a typed default (see the module docstring for their meaning)."""
  return ml_collections.ConfigDict(dict(
      name='sgd',                 # 'sgd' | 'adam' | 'adamw'
      lr=0.1,                     # peak learning rate; the schedule shapes it
      momentum=0.9,               # sgd; 0 = plain SGD
      nesterov=False,             # sgd
      b1=0.9, b2=0.999, eps=1e-8,  # adam, adamw (torch's defaults)
      weight_decay=0.0,
      weight_decay_mode='auto',   # 'auto' | 'coupled' (torch SGD/Adam) | 'decoupled' (AdamW)
      decay_bn_and_bias=True,     # False: no decay on biases and normalization parameters
      grad_clip_norm=0.0,         # global-norm clipping; 0 = off
      frozen=(),                  # patterns of parameters that get no updates
      trainable=(),               # if set, patterns of the only parameters that train
      lr_multipliers=(),          # 'pattern=factor' strings, e.g. ('layer4=0.1',)
      unfreeze_after_epochs=0.0,  # > 0: frozen parameters train after this many epochs
      unfrozen_lr_factor=1.0,     # every learning rate is multiplied by this after unfreezing
  ))


# ----------------------------------------------------------------------------------------------
# Parameter paths and masks


def param_path(keypath: Iterable[Any]) -> str:
  """'layer1_0/conv1/conv/kernel' for a key path from ``jax.tree_util.tree_flatten_with_path``."""
  parts = []
  for key in keypath:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _paths(params: Any) -> list[str]:
  return [param_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _map_paths(fn, params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda kp, _: fn(param_path(kp)), params)


def _compile(pattern: str) -> re.Pattern:
  try:
    return re.compile(f'(?:{pattern})(?:/.*)?')
  except re.error as e:
    raise ConfigError(f'Parameter pattern {pattern!r} is not a valid regular expression ({e}).') from None


def _patterns(value: Any) -> tuple[str, ...]:
  return (value,) if isinstance(value, str) else tuple(value)


def _matcher(params: Any, patterns: Iterable[str], what: str):
  """A path -> bool function; raises if a pattern matches no parameter path."""
  compiled = [_compile(p) for p in patterns]
  paths = _paths(params)
  for pattern, rx in zip(patterns, compiled):
    if not any(rx.fullmatch(path) for path in paths):
      raise ConfigError(f'{what} pattern {pattern!r} matches no parameter (e.g. {paths[0]!r}).'
                       if paths else f'{what} pattern {pattern!r} matches no parameter.')
  return lambda path: any(rx.fullmatch(path) for rx in compiled)


def frozen_mask(params: Any, patterns: Iterable[str]) -> Any:
  """A pytree of bools like ``params``: True where the path matches one of ``patterns``."""
  match = _matcher(params, _patterns(patterns), 'Frozen')
  return _map_paths(match, params)


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that decay when ``decay_bn_and_bias=False``: not a ``bias`` or ``scale``
  and not inside a normalization module (name starting with 'bn', or containing '_bn' or 'norm')."""
  def decays(path: str) -> bool:
    *modules, leaf = path.split('/')
    return leaf not in ('bias', 'scale') and not any(_NORM_MODULE.search(m) for m in modules)
  return _map_paths(decays, params)


def _labels(cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """'train', 'frozen' (never updated) or 'late' (frozen until unfreeze_after_epochs) per leaf."""
  frozen = _matcher(params, _patterns(cfg.frozen), 'Frozen')
  trainable = _matcher(params, _patterns(cfg.trainable), 'Trainable')
  has_trainable = bool(_patterns(cfg.trainable))
  held = 'late' if cfg.unfreeze_after_epochs > 0 else 'frozen'

  def label(path: str) -> str:
    return held if frozen(path) or (has_trainable and not trainable(path)) else 'train'
  return _map_paths(label, params)


def unfreeze_step(opt_cfg: Any, steps_per_epoch: int) -> int | None:
  """The optimizer step at which gradual unfreezing happens (None when it is off)."""
  cfg = merge_defaults(opt_cfg, default_optimizer_config(), 'optimizer')
  if cfg.unfreeze_after_epochs <= 0:
    return None
  return int(round(cfg.unfreeze_after_epochs * steps_per_epoch))


def untrained_mask(opt_cfg: Any, params: Any, step: int | None = None,
                   steps_per_epoch: int | None = None) -> Any:
  """True for parameters that get no update at optimizer ``step`` (None: the first step);
  the train step can ``jax.lax.stop_gradient`` them so their gradients are never computed."""
  cfg = merge_defaults(opt_cfg, default_optimizer_config(), 'optimizer')
  boundary = None if step is None else unfreeze_step(cfg, steps_per_epoch)
  unfrozen = boundary is not None and step >= boundary
  return jax.tree.map(lambda l: l == 'frozen' or (l == 'late' and not unfrozen), _labels(cfg, params))


def _lr_factors(cfg: ml_collections.ConfigDict, params: Any) -> Any | None:
  """Per-leaf learning-rate factor strings from 'pattern=factor' entries (first match wins)."""
  rules = []
  for entry in _patterns(cfg.lr_multipliers):
    pattern, sep, factor = str(entry).rpartition('=')
    try:
      value = float(factor)
    except ValueError:
      value = -1.0
    if not sep or not pattern or value < 0:
      raise ConfigError(f"lr_multipliers entry {entry!r} must look like 'pattern=factor' with factor >= 0.")
    rules.append((_matcher(params, [pattern], 'lr_multipliers'), value))
  if not rules:
    return None
  return _map_paths(lambda p: repr(next((v for m, v in rules if m(p)), 1.0)), params)


# ----------------------------------------------------------------------------------------------
# The optimizer


def _check_numbers(cfg: ml_collections.ConfigDict) -> None:
  check_choice(cfg.name, OPTIMIZERS, 'optimizer')
  check_choice(cfg.weight_decay_mode, WEIGHT_DECAY_MODES, 'weight_decay_mode')
  if cfg.name == 'adamw' and cfg.weight_decay_mode == 'coupled':
    raise ConfigError("adamw decays decoupled by definition; use name='adam' for coupled weight decay.")
  checks = [('lr', cfg.lr > 0), ('momentum', 0 <= cfg.momentum < 1), ('b1', 0 <= cfg.b1 < 1),
            ('b2', 0 <= cfg.b2 < 1), ('eps', cfg.eps >= 0), ('weight_decay', cfg.weight_decay >= 0),
            ('grad_clip_norm', cfg.grad_clip_norm >= 0),
            ('unfreeze_after_epochs', cfg.unfreeze_after_epochs >= 0),
            ('unfrozen_lr_factor', cfg.unfrozen_lr_factor >= 0)]
  for key, ok in checks:
    if not ok:
      raise ConfigError(f'optimizer {key}={cfg[key]} is out of range.')
  if cfg.nesterov and (cfg.name != 'sgd' or cfg.momentum == 0):
    raise ConfigError('nesterov=True needs the sgd optimizer with momentum > 0.')


def _core(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Weight decay + momentum/Adam + learning rate for the parameters that train."""
  mode = cfg.weight_decay_mode
  if mode == 'auto':
    mode = 'decoupled' if cfg.name == 'adamw' else 'coupled'
  decay = []
  if cfg.weight_decay:
    decay = [optax.add_decayed_weights(
        cfg.weight_decay, mask=None if cfg.decay_bn_and_bias else weight_decay_mask)]
  if cfg.name == 'sgd':
    direction = [optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum else []
  else:
    direction = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
  return optax.chain(*(decay if mode == 'coupled' else []), *direction,
                     *(decay if mode == 'decoupled' else []), optax.scale_by_learning_rate(schedule))


def make_optimizer(opt_cfg: Any, sched_cfg: Any, steps_per_epoch: int, total_steps: int,
                   params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for ``params`` (the 'params' collection) and its learning-rate schedule.

  The returned schedule is the learning rate of the parameters without a multiplier, including
  the ``unfrozen_lr_factor`` drop when gradual unfreezing is on. Patterns are validated against
  ``params`` here; the label functions are re-evaluated from the tree they are given, so a dict or
  a FrozenDict with the same paths both work.
  """
  cfg = merge_defaults(opt_cfg, default_optimizer_config(), 'optimizer')
  _check_numbers(cfg)
  base = make_schedule(sched_cfg, cfg.lr, steps_per_epoch, total_steps)
  labels = lambda tree: _labels(cfg, tree)
  present = set(jax.tree.leaves(labels(params)))
  factors = _lr_factors(cfg, params)  # validates lr_multipliers now
  if present == {'frozen'}:
    raise ConfigError('The frozen/trainable patterns freeze every parameter; nothing would train.')

  schedule, transforms, gates = base, {}, {'train': optax.identity()}
  if 'frozen' in present:
    transforms['frozen'] = gates['frozen'] = optax.set_to_zero()
  if cfg.unfreeze_after_epochs > 0:
    boundary = unfreeze_step(cfg, steps_per_epoch)
    if 'late' not in present:
      raise ConfigError('unfreeze_after_epochs needs frozen or trainable patterns to unfreeze.')
    if not 0 < boundary < total_steps:
      raise ConfigError(f'unfreeze_after_epochs={cfg.unfreeze_after_epochs} must fall inside '
                       f'training ({total_steps} steps).')
    factor = cfg.unfrozen_lr_factor
    schedule = lambda step: base(step) * jnp.where(step >= boundary, factor, 1.0)
    late_schedule = lambda count: schedule(count + boundary)  # its count starts at the boundary
    unfrozen = lambda count: count >= boundary
    transforms['late'] = optax.conditionally_mask(_core(cfg, late_schedule), unfrozen)
    gates['late'] = optax.conditionally_mask(optax.identity(), unfrozen)

  transforms['train'] = _core(cfg, schedule)
  chain = []
  if cfg.grad_clip_norm:
    if present != {'train'}:  # clip over the parameters being trained at this step only
      chain.append(optax.partition(gates, labels))
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(optax.partition(transforms, labels) if present != {'train'} else transforms['train'])
  if factors is not None:
    scales = {f: optax.scale(float(f)) for f in set(jax.tree.leaves(factors))}
    chain.append(optax.partition(scales, lambda tree: _lr_factors(cfg, tree)))
  return optax.chain(*chain), schedule
