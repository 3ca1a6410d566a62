"""Optimizers and weight-decay masks, built from config (schedules: `cnnjax.schedules`).

Everything here is assembled from Optax pieces; the config (``ml_collections.ConfigDict``) is the
only input. ``make_optimizer`` returns an ``optax.GradientTransformation`` plus the schedule (for
logging); schedules are stepped once per optimizer step, epoch-valued fields are converted with
``steps_per_epoch`` (rounded to whole steps) and count from the start of training. Parameters are
named by paths and patterns (`cnnjax.paths`), e.g. ``layer1_0/bn1/scale`` or 'fc'.

Weight decay (``weight_decay_mode``)
  'coupled' adds ``weight_decay * param`` to the gradient before momentum/Adam, exactly like
  ``torch.optim.SGD`` / ``torch.optim.Adam``; 'decoupled' adds it to the final direction, scaled by
  the learning rate, exactly like ``torch.optim.AdamW`` (SGD + decoupled is SGDW). 'auto' picks
  coupled for sgd/adam and decoupled for adamw. ``decay_bn_and_bias=False`` exempts (see
  ``weight_decay_mask``) every parameter named ``bias`` or ``scale`` and every parameter of a
  normalization module, i.e. a module whose name starts with 'bn' or contains '_bn' or 'norm'
  (case-insensitive: bn1, downsample_bn, BatchNorm_0, LayerNorm_0).

Layer-wise adaptive optimizers for large batches (``name='lars'|'lamb'``; the decay placement is
part of their definition, so ``weight_decay_mode`` stays 'auto')
  'lars' (You et al. 2017, arXiv:1708.03888, Algorithm 1): per parameter tensor, the local rate
  ``trust_coefficient * |w| / (|g| + weight_decay * |w|)`` scales ``g + weight_decay * w``, then
  momentum ``v = momentum * v + lr * that`` (``nesterov`` too) and ``w -= v``. The denominator is
  the paper's (and TF's, MLPerf's, timm's ``Lars``); ``optax.lars`` uses ``|g + weight_decay * w|``
  instead, so cnnjax chains optax's momentum and learning rate after its own trust ratio.
  'lamb' (You et al. 2020, arXiv:1904.00962, Algorithm 2; ``optax.lamb``'s pieces): the Adam
  direction ``r`` (bias-corrected, ``b1``, ``b2``, ``eps``) plus ``weight_decay * w``, scaled by
  ``|w| / |r + weight_decay * w|`` and the learning rate. With ``decay_bn_and_bias=False`` biases
  and normalization parameters get neither weight decay nor the trust ratio (a plain momentum /
  Adam step), as the papers' implementations exclude them (TF's LARS skip list, BERT's
  ``exclude_from_layer_adaptation``; timm's ``always_adapt=False``). A zero norm gives ratio 1.

Fine-tuning
  ``frozen`` / ``trainable`` / ``unfreeze_after_epochs`` select what trains when; `cnnjax.freezing`
  is their one home, and the optimizer follows its labels: 'frozen' parameters get exactly zero
  updates and no optimizer state (``optax.set_to_zero``), 'late' ones run their own copy of the
  optimizer inside ``optax.conditionally_mask`` until the boundary, after which every learning
  rate is multiplied by ``unfrozen_lr_factor`` (the late group's schedule is shifted so it sees the
  same rate as the rest). Global-norm clipping sees only the parameters being trained at that
  step. ``lr_multipliers`` ('pattern=factor', first match wins) scale the final update of matching
  parameters: the discriminative learning rates of torch param groups.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cnnjax import freezing, paths
from cnnjax.config import check_choice, merge_defaults
from cnnjax.errors import ConfigError
from cnnjax.schedules import make_schedule

OPTIMIZERS = ('sgd', 'adam', 'adamw', 'lars', 'lamb')
WEIGHT_DECAY_MODES = ('auto', 'coupled', 'decoupled')
_NORM_MODULE = re.compile(r'^bn|_bn|norm', re.IGNORECASE)


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Every optimizer field with a typed default (see the module docstring for their meaning)."""
  return ml_collections.ConfigDict(dict(
      name='sgd',                 # 'sgd' | 'adam' | 'adamw' | 'lars' | 'lamb'
      lr=0.1,                     # peak learning rate; the schedule shapes it
      momentum=0.9,               # sgd, lars; 0 = plain SGD
      nesterov=False,             # sgd, lars
      b1=0.9, b2=0.999, eps=1e-8,  # adam, adamw, lamb (torch's defaults; LAMB's paper: eps 1e-6)
      trust_coefficient=0.001,    # lars: the paper's eta in its local learning rate
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
# Masks


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that decay when ``decay_bn_and_bias=False``: not a ``bias`` or ``scale``
  and not inside a normalization module (name starting with 'bn', or containing '_bn' or 'norm')."""
  def decays(path: str) -> bool:
    *modules, leaf = path.split('/')
    return leaf not in ('bias', 'scale') and not any(_NORM_MODULE.search(m) for m in modules)
  return paths.map_paths(decays, params)


def _lr_factors(cfg: ml_collections.ConfigDict, params: Any) -> Any | None:
  """Per-leaf learning-rate factor strings from 'pattern=factor' entries (first match wins)."""
  rules = []
  for entry in paths.as_patterns(cfg.lr_multipliers):
    pattern, sep, factor = str(entry).rpartition('=')
    try:
      value = float(factor)
    except ValueError:
      value = -1.0
    if not sep or not pattern or value < 0:
      raise ConfigError(f"lr_multipliers entry {entry!r} must look like 'pattern=factor' with factor >= 0.")
    rules.append((paths.matcher(paths.tree_paths(params), [pattern], 'lr_multipliers'), value))
  if not rules:
    return None
  return paths.map_paths(lambda p: repr(next((v for m, v in rules if m(p)), 1.0)), params)


# ----------------------------------------------------------------------------------------------
# The optimizer


def _check_numbers(cfg: ml_collections.ConfigDict) -> None:
  check_choice(cfg.name, OPTIMIZERS, 'optimizer')
  check_choice(cfg.weight_decay_mode, WEIGHT_DECAY_MODES, 'weight_decay_mode')
  if cfg.name == 'adamw' and cfg.weight_decay_mode == 'coupled':
    raise ConfigError("adamw decays decoupled by definition; use name='adam' for coupled weight decay.")
  if cfg.name in ('lars', 'lamb') and cfg.weight_decay_mode != 'auto':
    raise ConfigError(f"{cfg.name} places its weight decay by definition; leave "
                      f"weight_decay_mode='auto'.")
  checks = [('lr', cfg.lr > 0), ('momentum', 0 <= cfg.momentum < 1), ('b1', 0 <= cfg.b1 < 1),
            ('b2', 0 <= cfg.b2 < 1), ('eps', cfg.eps >= 0), ('weight_decay', cfg.weight_decay >= 0),
            ('grad_clip_norm', cfg.grad_clip_norm >= 0),
            ('trust_coefficient', cfg.trust_coefficient > 0),
            ('unfreeze_after_epochs', cfg.unfreeze_after_epochs >= 0),
            ('unfrozen_lr_factor', cfg.unfrozen_lr_factor >= 0)]
  for key, ok in checks:
    if not ok:
      raise ConfigError(f'optimizer {key}={cfg[key]} is out of range.')
  if cfg.nesterov and (cfg.name not in ('sgd', 'lars') or cfg.momentum == 0):
    raise ConfigError('nesterov=True needs the sgd or lars optimizer with momentum > 0.')


def scale_by_lars(trust_coefficient: float, weight_decay: float,
                  mask: Any = None) -> optax.GradientTransformation:
  """LARS's decayed gradient times its local learning rate (You et al. 2017, Algorithm 1):
  ``(g + wd * w) * trust_coefficient * |w| / (|g| + wd * |w|)`` per tensor (1 where a norm is
  0); where ``mask`` (a tree or a function of the params, like ``optax.masked``'s) is False, ``g``
  passes unchanged: no decay, no trust ratio."""
  def update_fn(updates, state, params):
    def adapt(g, w):
      w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
      ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm)
      ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
      return ((g + weight_decay * w) * ratio).astype(g.dtype)
    return jax.tree.map(adapt, updates, params), state
  inner = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
  return inner if mask is None else optax.masked(inner, mask)


def _core(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Weight decay + momentum/Adam + learning rate for the parameters that train."""
  mask = None if cfg.decay_bn_and_bias else weight_decay_mask
  if cfg.name == 'lars':
    momentum = [optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum else []
    return optax.chain(scale_by_lars(cfg.trust_coefficient, cfg.weight_decay, mask),
                       optax.scale_by_learning_rate(schedule), *momentum)
  if cfg.name == 'lamb':
    trust = optax.scale_by_trust_ratio()
    return optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                       optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                       trust if mask is None else optax.masked(trust, mask),
                       optax.scale_by_learning_rate(schedule))
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
  labels = lambda tree: freezing.labels(cfg, tree)
  present = set(jax.tree.leaves(labels(params)))
  factors = _lr_factors(cfg, params)  # validates lr_multipliers now
  if present == {'frozen'}:
    raise ConfigError('The frozen/trainable patterns freeze every parameter; nothing would train.')

  schedule, transforms, gates = base, {}, {'train': optax.identity()}
  if 'frozen' in present:
    transforms['frozen'] = gates['frozen'] = optax.set_to_zero()
  if cfg.unfreeze_after_epochs > 0:
    boundary = freezing.unfreeze_step(cfg, steps_per_epoch)
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
