"""An exponential moving average (EMA) of the weights, kept on the device in the train state.

`train.ema_decay = d > 0` keeps, after every optimizer step t (1, 2, ...),

    ema_t = d_t * ema_{t-1} + (1 - d_t) * weights_t,     ema_0 = the initial weights,

over the model's `params` *and* its BatchNorm running statistics (`batch_stats`), as timm's
ModelEmaV2/ModelEmaV3 average every floating-point entry of the state_dict (parameters and
buffers); torch.optim.swa_utils' `get_ema_multi_avg_fn(d)` is the same update. Without warmup
d_t = d (timm ModelEmaV2). With `train.ema_warmup_power = p > 0`, d_t is timm ModelEmaV3's
warmup (use_warmup=True, warmup_gamma=1, warmup_power=p, called with step=t as timm's train.py
does): 0 at t = 1 (the EMA becomes a copy), then min(d, 1 - t ** -p) (timm's
`1 - (1 + (t - 1) / gamma) ** -p`), so early averages are not dominated by the random
initialization.

The EMA lives in `TrainState.ema` ({'params', 'batch_stats'}, float32 like the weights) and is
checkpointed with the state, so a resumed run continues it exactly. The loop evaluates both
weights (`test_*` for the trained weights, `test_ema_*` for the average); a checkpoint's EMA is
what `transfer.init_from` and `--visualize` read when it has one.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cnnjax.errors import ConfigError


def check(decay: float, warmup_power: float) -> None:
  if not 0.0 <= decay < 1.0:
    raise ConfigError(f'train.ema_decay must be in [0, 1) (0 = off), got {decay}.')
  if warmup_power < 0 or (warmup_power and not decay):
    raise ConfigError(f'train.ema_warmup_power must be >= 0 and needs train.ema_decay > 0, got '
                      f'{warmup_power} with ema_decay={decay}.')


def init(variables: dict) -> dict:
  """ema_0: a copy (its own buffers: the steps donate the state) of params and batch_stats."""
  return jax.tree.map(jnp.array, {'params': variables['params'],
                                  'batch_stats': variables.get('batch_stats', {})})


def decay_at(step: jax.Array, decay: float, warmup_power: float = 0.0) -> jax.Array:
  """d_t for optimizer step `step` = t >= 1 (see the module docstring)."""
  if not warmup_power:
    return jnp.asarray(decay, jnp.float32)
  t = jnp.maximum(step - 1, 0).astype(jnp.float32)
  warm = jnp.clip(1.0 - (1.0 + t) ** -warmup_power, 0.0, decay)
  return jnp.where(t <= 0, 0.0, warm)


def update(ema: dict, params: Any, batch_stats: Any, decay: jax.Array) -> dict:
  """d * ema + (1 - d) * the new weights, leaf by leaf."""
  new = {'params': params, 'batch_stats': batch_stats}
  return jax.tree.map(lambda e, w: (decay * e + (1.0 - decay) * w).astype(e.dtype), ema, new)


def swap_in(state):
  """`state` with its EMA as the weights (what evaluation of the average runs on)."""
  return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'])
