"""Learning-rate schedules from config, matching PyTorch's lr_scheduler step for step.

``make_schedule`` turns the ``schedule`` config into an ``optax.Schedule`` of the optimizer step;
epoch-valued fields are converted with ``steps_per_epoch`` (rounded to whole steps) and count from
the start of training. Any schedule but 'onecycle' can have a linear warmup in front.
`cnnjax.optim` builds the optimizer around it.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import optax

from cnnjax.config import check_choice, merge_defaults
from cnnjax.errors import ConfigError

SCHEDULES = ('constant', 'step', 'piecewise', 'cosine', 'warmup_cosine', 'onecycle', 'linear')


def default_schedule_config() -> ml_collections.ConfigDict:
  """Every schedule field with a typed default; epochs may be fractional."""
  return ml_collections.ConfigDict(dict(
      name='constant',   # one of SCHEDULES
      warmup_epochs=0.0,        # linear warmup in front of any schedule but onecycle
      warmup_start_factor=0.0,  # warmup starts at this fraction of the peak
      step_epochs=30.0,         # 'step': multiply by decay_factor every step_epochs (StepLR)
      boundaries_epochs=(),     # 'piecewise': multiply by decay_factor at each (MultiStepLR)
      decay_factor=0.1,
      final_fraction=0.0,       # cosine, warmup_cosine, linear: end at this fraction of the peak
      pct_start=0.3,            # onecycle, as torch.optim.lr_scheduler.OneCycleLR
      div_factor=25.0,
      final_div_factor=1e4,
  ))


def make_schedule(sched_cfg: Any, peak_lr: float, steps_per_epoch: int,
                  total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step (0 = before the first update).

  The value at step ``n`` equals PyTorch's learning rate after ``n`` calls of
  ``scheduler.step()`` for StepLR, MultiStepLR, CosineAnnealingLR(T_max=total_steps,
  eta_min=final_fraction*peak), LinearLR(1, final_fraction, total_steps) and OneCycleLR
  (anneal_strategy='cos'; momentum is not cycled).
  """
  cfg = merge_defaults(sched_cfg, default_schedule_config(), 'schedule')
  check_choice(cfg.name, SCHEDULES, 'schedule')
  if steps_per_epoch < 1 or total_steps < 1:
    raise ConfigError(f'steps_per_epoch ({steps_per_epoch}) and total_steps ({total_steps}) must be positive.')
  to_steps = lambda epochs: int(round(epochs * steps_per_epoch))
  warmup = to_steps(cfg.warmup_epochs)
  if cfg.warmup_epochs < 0 or warmup >= total_steps:
    raise ConfigError(f'warmup_epochs={cfg.warmup_epochs} must be >= 0 and shorter than training '
                     f'({total_steps} steps).')
  if cfg.name == 'onecycle':
    if warmup:
      raise ConfigError('The onecycle schedule warms up by pct_start; set warmup_epochs=0.')
    return _onecycle(cfg, peak_lr, total_steps)
  if cfg.name == 'warmup_cosine' and not warmup:
    raise ConfigError('The warmup_cosine schedule needs warmup_epochs > 0.')

  decay_steps = total_steps - warmup
  if cfg.name == 'constant':
    main = optax.constant_schedule(peak_lr)
  elif cfg.name in ('cosine', 'warmup_cosine'):
    main = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=cfg.final_fraction)
  elif cfg.name == 'linear':
    main = optax.linear_schedule(peak_lr, cfg.final_fraction * peak_lr, decay_steps)
  else:  # step, piecewise: boundaries are absolute epochs
    if cfg.name == 'step':
      period = to_steps(cfg.step_epochs)
      if period < 1:
        raise ConfigError(f'step_epochs={cfg.step_epochs} must be at least one step long.')
      boundaries = list(range(period, total_steps, period))
    else:
      if not cfg.boundaries_epochs:
        raise ConfigError('The piecewise schedule needs boundaries_epochs, e.g. (100, 150).')
      boundaries = [to_steps(b) for b in cfg.boundaries_epochs]
      if any(b <= warmup for b in boundaries) or boundaries != sorted(set(boundaries)):
        raise ConfigError(f'boundaries_epochs {tuple(cfg.boundaries_epochs)} must increase and lie '
                         f'after the warmup.')
    main = optax.piecewise_constant_schedule(
        peak_lr, {b - warmup: cfg.decay_factor for b in boundaries})
  if not warmup:
    return main
  warm = optax.linear_schedule(cfg.warmup_start_factor * peak_lr, peak_lr, warmup)
  return optax.join_schedules([warm, main], [warmup])


def _onecycle(cfg: ml_collections.ConfigDict, peak_lr: float, total_steps: int) -> optax.Schedule:
  # torch's OneCycleLR peaks at step pct_start*total - 1 and ends at total - 1 (optax's
  # cosine_onecycle_schedule one step later), so build it from the same interpolation pieces.
  peak_step, end_step = cfg.pct_start * total_steps - 1, total_steps - 1
  if not 0 < peak_step < end_step:
    raise ConfigError(f'onecycle needs 0 < pct_start*total_steps - 1 < total_steps - 1, got '
                     f'pct_start={cfg.pct_start} with {total_steps} steps.')
  if cfg.div_factor <= 0 or cfg.final_div_factor <= 0:
    raise ConfigError('onecycle div_factor and final_div_factor must be positive.')
  return optax.piecewise_interpolate_schedule(
      'cosine', peak_lr / cfg.div_factor,
      {peak_step: cfg.div_factor, end_step: 1.0 / (cfg.div_factor * cfg.final_div_factor)})
