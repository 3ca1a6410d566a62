"""Tests for cnnjax.optim: schedules and optimizers against closed forms and PyTorch, masks, freezing."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import freezing, layers, optim, paths, schedules

SPE, EPOCHS, PEAK = 7, 10, 0.1   # steps per epoch, epochs, peak learning rate
TOTAL = SPE * EPOCHS


def schedule_values(name, total=TOTAL, **fields):
  cfg = schedules.default_schedule_config()
  cfg.name = name
  cfg.update(fields)
  sched = schedules.make_schedule(cfg, PEAK, SPE, total)
  return np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(total)), np.float64)


def torch_lrs(make_scheduler, total=TOTAL):
  """Learning rates torch uses at optimizer steps 0..total-1 (scheduler stepped after each)."""
  torch = pytest.importorskip('torch')
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=PEAK)
  sched = make_scheduler(torch.optim.lr_scheduler, opt)
  lrs = []
  for _ in range(total):
    lrs.append(opt.param_groups[0]['lr'])
    opt.step()
    sched.step()
  return np.array(lrs)


def cos_interp(start, end, pct):
  return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


# --------------------------------------------------------------------------- schedules: formulas

def test_constant_with_warmup_formula():
  got = schedule_values('constant', warmup_epochs=2.0, warmup_start_factor=0.2)
  w = 2 * SPE
  want = [PEAK * (0.2 + 0.8 * t / w) if t < w else PEAK for t in range(TOTAL)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_step_and_piecewise_formula():
  got = schedule_values('step', step_epochs=3.0, decay_factor=0.5)
  np.testing.assert_allclose(got, [PEAK * 0.5 ** (t // (3 * SPE)) for t in range(TOTAL)], rtol=1e-6)
  got = schedule_values('piecewise', boundaries_epochs=(2.5, 7), decay_factor=0.1)
  b1, b2 = round(2.5 * SPE), 7 * SPE
  want = [PEAK * (1 if t < b1 else 0.1 if t < b2 else 0.01) for t in range(TOTAL)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cosine_linear_warmup_cosine_formula():
  ff = 0.05
  got = schedule_values('cosine', final_fraction=ff)
  want = [PEAK * (ff + (1 - ff) * (1 + math.cos(math.pi * t / TOTAL)) / 2) for t in range(TOTAL)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got = schedule_values('linear', final_fraction=ff)
  np.testing.assert_allclose(got, [PEAK * (1 + (ff - 1) * t / TOTAL) for t in range(TOTAL)], rtol=1e-5)
  w = SPE
  got = schedule_values('warmup_cosine', warmup_epochs=1.0)
  want = [PEAK * t / w if t < w else PEAK * (1 + math.cos(math.pi * (t - w) / (TOTAL - w))) / 2
          for t in range(TOTAL)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert got[w] == pytest.approx(PEAK) and got.max() == pytest.approx(PEAK)


def test_onecycle_formula():
  # PyTorch's OneCycleLR: peak at step pct*T - 1, minimum initial/final_div at step T - 1.
  got = schedule_values('onecycle', pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
  p, end = 0.25 * TOTAL - 1, TOTAL - 1
  init, low = PEAK / 10, PEAK / 10 / 100
  want = [cos_interp(init, PEAK, t / p) if t <= p else cos_interp(PEAK, low, (t - p) / (end - p))
          for t in range(TOTAL)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[0] == pytest.approx(init) and got[-1] == pytest.approx(low, rel=1e-4)


# --------------------------------------------------------------------------- schedules: PyTorch

@pytest.mark.parametrize('name,fields,make', [
    ('step', dict(step_epochs=3.0, decay_factor=0.5),
     lambda s, o: s.StepLR(o, step_size=3 * SPE, gamma=0.5)),
    ('piecewise', dict(boundaries_epochs=(2.0, 7.0), decay_factor=0.1),
     lambda s, o: s.MultiStepLR(o, milestones=[2 * SPE, 7 * SPE], gamma=0.1)),
    ('cosine', dict(final_fraction=0.01),
     lambda s, o: s.CosineAnnealingLR(o, T_max=TOTAL, eta_min=0.01 * PEAK)),
    ('linear', dict(final_fraction=0.1),
     lambda s, o: s.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=TOTAL)),
    ('onecycle', dict(),   # torch defaults: pct_start 0.3, div 25, final_div 1e4
     lambda s, o: s.OneCycleLR(o, max_lr=PEAK, total_steps=TOTAL, cycle_momentum=False)),
    ('onecycle', dict(pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
     lambda s, o: s.OneCycleLR(o, max_lr=PEAK, total_steps=TOTAL, pct_start=0.25, div_factor=10,
                               final_div_factor=100, cycle_momentum=False)),
    ('constant', dict(warmup_epochs=1.0, warmup_start_factor=0.1),
     lambda s, o: s.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=SPE)),
])
def test_schedules_match_torch(name, fields, make):
  want = torch_lrs(make)
  np.testing.assert_allclose(schedule_values(name, **fields), want, rtol=1e-5, atol=PEAK * 1e-6)


# --------------------------------------------------------------------------- optimizers vs torch

def _quadratic_problem():
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': rng.normal(size=(3, 2)).astype(np.float32),
                     'bias': rng.normal(size=(2,)).astype(np.float32)},
            'bn1': {'scale': rng.normal(size=(2,)).astype(np.float32)}}
  a = rng.normal(size=(5, 3)).astype(np.float32)
  t = rng.normal(size=(5, 2)).astype(np.float32)

  def loss(p, lib):  # works for jnp and torch
    y = a_lib(lib, a) @ p['conv']['kernel'] + p['conv']['bias']
    return 0.5 * ((y * p['bn1']['scale'] - a_lib(lib, t)) ** 2).sum()
  return params, loss


def a_lib(lib, x):
  return jnp.asarray(x) if lib is jnp else lib.from_numpy(x)


@pytest.mark.parametrize('opt_fields,torch_name,torch_kw', [
    (dict(name='sgd', momentum=0.9, weight_decay=0.05), 'SGD', dict(momentum=0.9)),
    (dict(name='sgd', momentum=0.8, nesterov=True, weight_decay=0.05, grad_clip_norm=1.0),
     'SGD', dict(momentum=0.8, nesterov=True)),
    (dict(name='adam', weight_decay=0.05, b1=0.8, eps=1e-6), 'Adam', dict(betas=(0.8, 0.999), eps=1e-6)),
    (dict(name='adamw', weight_decay=0.1), 'AdamW', dict()),
])
@pytest.mark.parametrize('decay_bn_and_bias', [True, False])
def test_optimizer_matches_torch(opt_fields, torch_name, torch_kw, decay_bn_and_bias):
  torch = pytest.importorskip('torch')
  params, loss = _quadratic_problem()
  cfg = optim.default_optimizer_config()
  cfg.update(dict(opt_fields, lr=0.05, decay_bn_and_bias=decay_bn_and_bias))
  sched_cfg = dict(name='step', step_epochs=1.0, decay_factor=0.5)
  tx, _ = optim.make_optimizer(cfg, sched_cfg, 2, 6, params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p, jnp)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  tp = jax.tree.map(lambda x: torch.tensor(x, requires_grad=True), params)
  decayed = [tp['conv']['kernel']] + ([tp['conv']['bias'], tp['bn1']['scale']] if decay_bn_and_bias else [])
  rest = [] if decay_bn_and_bias else [tp['conv']['bias'], tp['bn1']['scale']]
  groups = [{'params': decayed, 'weight_decay': cfg.weight_decay}] + (
      [{'params': rest, 'weight_decay': 0.0}] if rest else [])
  topt = getattr(torch.optim, torch_name)(groups, lr=0.05, **torch_kw)
  tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)

  p, s = params, tx.init(params)
  for _ in range(6):
    p, s = step(p, s)
    topt.zero_grad()
    loss(tp, torch).backward()
    if cfg.grad_clip_norm:
      norm = torch.nn.utils.clip_grad_norm_([x for g in groups for x in g['params']],
                                            cfg.grad_clip_norm)
      assert norm > cfg.grad_clip_norm  # the clipping is engaged, so the comparison tests it
    topt.step()
    tsched.step()
    for got, want in zip(jax.tree.leaves(p), jax.tree.leaves(tp)):
      np.testing.assert_allclose(got, want.detach().numpy(), rtol=2e-5, atol=2e-6)
  assert not np.allclose(p['conv']['kernel'], params['conv']['kernel'])


# --------------------------------------------------------------------------- LARS and LAMB

def _paper_step(name, params, grads, lr, wd, adapted, m=None, v=None, t=1, mom=0.9, tc=0.001,
                b1=0.9, b2=0.999, eps=1e-6):
  """One step of LARS (You et al. 2017, Alg. 1) or LAMB (You et al. 2020, Alg. 2) in NumPy, per
  tensor; `adapted[path]` False: no weight decay and no trust ratio for that tensor."""
  new, m, v = {}, dict(m or {}), dict(v or {})
  for path, w in params.items():
    g = grads[path].astype(np.float64)
    w = w.astype(np.float64)
    lam = wd if adapted[path] else 0.0
    if name == 'lars':
      local = tc * np.linalg.norm(w) / (np.linalg.norm(g) + lam * np.linalg.norm(w))
      local = local if adapted[path] else 1.0
      m[path] = mom * m.get(path, 0.0) + lr * local * (g + lam * w)
      new[path] = w - m[path]
    else:
      m[path] = b1 * m.get(path, 0.0) + (1 - b1) * g
      v[path] = b2 * v.get(path, 0.0) + (1 - b2) * g * g
      r = (m[path] / (1 - b1 ** t)) / (np.sqrt(v[path] / (1 - b2 ** t)) + eps) + lam * w
      ratio = np.linalg.norm(w) / np.linalg.norm(r) if adapted[path] else 1.0
      new[path] = w - lr * ratio * r
  return new, m, v


@pytest.mark.parametrize('name', ['lars', 'lamb'])
@pytest.mark.parametrize('decay_bn_and_bias', [True, False])
def test_lars_and_lamb_match_the_papers_formulas(net_params, name, decay_bn_and_bias):
  """Two steps (a learning rate that changes in between) against the algorithms written out in
  NumPy; with decay_bn_and_bias=False biases and norm parameters get a plain step."""
  cfg = optim.default_optimizer_config()
  cfg.update(dict(name=name, lr=0.5 if name == 'lars' else 0.01, weight_decay=0.01, eps=1e-6,
                  decay_bn_and_bias=decay_bn_and_bias, trust_coefficient=0.02))
  sched = dict(name='step', step_epochs=0.5, decay_factor=0.5)   # lr halves after step 1
  tx, _ = optim.make_optimizer(cfg, sched, 2, 8, net_params)
  rng = np.random.default_rng(3)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), net_params)
           for _ in range(2)]
  adapted = flat(jax.tree.map(lambda _: decay_bn_and_bias, net_params)) if decay_bn_and_bias \
      else flat(optim.weight_decay_mask(net_params))
  p, s = net_params, tx.init(net_params)
  want, m, v = flat(jax.device_get(net_params)), None, None
  for t, g in enumerate(grads):
    u, s = jax.jit(tx.update)(g, s, p)
    p = optax.apply_updates(p, u)
    want, m, v = _paper_step(name, want, flat(jax.device_get(g)), cfg.lr * 0.5 ** t,
                             cfg.weight_decay, adapted, m, v, t=t + 1, tc=cfg.trust_coefficient)
    for path, got in flat(p).items():
      np.testing.assert_allclose(got, want[path], rtol=2e-5, atol=1e-6, err_msg=f'{path} {t}')
  # the trust ratio matters: the steps differ from plain momentum SGD / Adam at the same rate
  plain = optax.sgd(cfg.lr, momentum=0.9) if name == 'lars' else optax.adam(cfg.lr, eps=1e-6)
  u, _ = plain.update(grads[0], plain.init(net_params), net_params)
  first = optax.apply_updates(net_params, tx.update(grads[0], tx.init(net_params), net_params)[0])
  assert not np.allclose(flat(first)['fc/kernel'], flat(optax.apply_updates(net_params, u))['fc/kernel'])


@pytest.mark.parametrize('name', ['lars', 'lamb'])
def test_lars_and_lamb_match_timm(name):
  """Six steps on the quadratic problem against timm's Lars / Lamb (constant lr: timm applies
  LARS's rate outside the momentum, the paper inside; the same when the rate is constant). BN
  scale and bias in a group with no weight decay: timm then skips their adaptation too."""
  torch = pytest.importorskip('torch')
  timm_optim = pytest.importorskip('timm.optim')
  params, loss = _quadratic_problem()
  cfg = optim.default_optimizer_config()
  cfg.update(dict(name=name, lr=0.3 if name == 'lars' else 0.02, weight_decay=0.05, eps=1e-6,
                  momentum=0.9, trust_coefficient=0.01, decay_bn_and_bias=False))
  tx, _ = optim.make_optimizer(cfg, None, 2, 6, params)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.grad(loss)(p, jnp), s, p)))
  tp = jax.tree.map(lambda x: torch.tensor(x, requires_grad=True), params)
  groups = [{'params': [tp['conv']['kernel']], 'weight_decay': cfg.weight_decay},
            {'params': [tp['conv']['bias'], tp['bn1']['scale']], 'weight_decay': 0.0}]
  if name == 'lars':
    topt = timm_optim.Lars(groups, lr=cfg.lr, momentum=0.9, trust_coeff=cfg.trust_coefficient,
                           eps=0.0)
  else:
    topt = timm_optim.Lamb(groups, lr=cfg.lr, eps=cfg.eps, max_grad_norm=None)
  p, s = params, tx.init(params)
  for _ in range(6):
    p, s = step(p, s)
    topt.zero_grad()
    loss(tp, torch).backward()
    topt.step()
  for got, want in zip(jax.tree.leaves(p), jax.tree.leaves(tp)):
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------- masks on a real model

class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = layers.Conv2d(4, 3, padding=1, use_bias=False, name='conv1')(x)
    y = layers.BatchNorm(use_running_average=False, name='bn1')(y)
    return y + layers.BatchNorm(use_running_average=False, name='downsample_bn')(
        layers.Conv2d(4, 1, name='downsample')(x))


class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = layers.Conv2d(2, 3, padding=1, name='conv1')(x)
    x = Block(name='layer1_0')(x)
    return layers.Linear(3, name='fc')(layers.GlobalAvgPool()(x))


@pytest.fixture(scope='module')
def net_params():
  variables = jax.eval_shape(TinyNet().init, jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), variables['params'])


def flat(tree):
  return {paths.param_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_paths_and_weight_decay_mask(net_params):
  assert flat(optim.weight_decay_mask(net_params)) == {
      'conv1/bias': False, 'conv1/kernel': True, 'fc/bias': False,
      'fc/kernel': True, 'layer1_0/bn1/bias': False, 'layer1_0/bn1/scale': False,
      'layer1_0/conv1/kernel': True, 'layer1_0/downsample/bias': False,
      'layer1_0/downsample/kernel': True, 'layer1_0/downsample_bn/bias': False,
      'layer1_0/downsample_bn/scale': False}
  assert flat(optim.weight_decay_mask({'LayerNorm_0': {'gamma': 1.0}, 'norm': {'w': 1.0}})) == {
      'LayerNorm_0/gamma': False, 'norm/w': False}
  assert paths.param_path(jax.tree_util.tree_flatten_with_path([{'a': (1, 2)}])[0][1][0]) == '0/a/1'
  assert flat(paths.pattern_mask(net_params, ['layer1_0', '.*/kernel'])) == {
      k: k.startswith('layer1_0/') or k.endswith('/kernel') for k in flat(net_params)}


def _run(cfg, params, steps, spe=2, total=8, sched=None):
  tx, schedule = optim.make_optimizer(cfg, sched, spe, total, params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s
  history, state = [params], tx.init(params)
  for _ in range(steps):
    p, state = step(history[-1], state)
    history.append(p)
  return history, state, schedule


def test_weight_decay_exempts_bn_and_bias(net_params):
  cfg = optim.default_optimizer_config()
  cfg.update(dict(momentum=0.0, weight_decay=0.1, decay_bn_and_bias=False))
  (p0, p1), _, _ = _run(cfg, net_params, 1)
  mask = flat(optim.weight_decay_mask(net_params))
  for path, new in flat(p1).items():
    old = flat(p0)[path]
    want = old - 0.1 * (0.5 + (0.1 * old if mask[path] else 0.0))
    np.testing.assert_allclose(new, want, rtol=1e-6, atol=1e-7, err_msg=path)


def test_frozen_get_no_updates_and_no_state(net_params):
  for fields in (dict(frozen=('layer1_0', 'conv1')), dict(trainable=('fc',))):
    cfg = optim.default_optimizer_config()
    cfg.update(dict(fields, name='adam', lr=0.01, weight_decay=0.1, decay_bn_and_bias=False,
                     grad_clip_norm=0.1))
    history, state, _ = _run(cfg, net_params, 3)
    for path, new in flat(history[-1]).items():
      same = np.array_equal(new, flat(net_params)[path])
      assert same == (not path.startswith('fc/')), path
    # Adam moments exist only for fc's kernel and bias: 2 x 2 arrays plus scalar counters.
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert len(moments) == 4
  untrained = freezing.untrained_paths(dict(trainable=['fc']), net_params)
  assert sorted(set(flat(net_params)) - set(untrained)) == ['fc/bias', 'fc/kernel']


def test_gradual_unfreezing_starts_fresh_at_lower_rate(net_params):
  cfg = optim.default_optimizer_config()
  cfg.update(dict(trainable=('fc',), unfreeze_after_epochs=1.5, unfrozen_lr_factor=0.1,
                  momentum=0.9, lr=0.2))
  history, _, schedule = _run(cfg, net_params, 5, spe=2)  # boundary at step 3
  deltas = [flat(jax.tree.map(lambda a, b: b - a, x, y)) for x, y in zip(history, history[1:])]
  for t, d in enumerate(deltas):
    for path, delta in d.items():
      if path.startswith('fc/'):
        continue
      if t < 3:
        assert not np.any(delta), (t, path)
      elif t == 3:  # momentum starts at zero: exactly lr * factor * grad
        np.testing.assert_allclose(delta, -0.2 * 0.1 * 0.5, rtol=1e-5)
      else:
        np.testing.assert_allclose(delta, -0.02 * 0.5 * 1.9, rtol=1e-5)
  # the head keeps its momentum and drops to the lower rate too: 0.02 * 0.5 * (1 + .9 + .9^2 + .9^3)
  np.testing.assert_allclose(deltas[3]['fc/kernel'], -0.02 * 0.5 * 3.439, rtol=1e-5)
  assert float(schedule(2)) == pytest.approx(0.2) and float(schedule(3)) == pytest.approx(0.02)
  assert freezing.unfreeze_step(cfg, 2) == 3 and freezing.unfreeze_step({}, 2) is None
  untrained = [freezing.untrained_paths(cfg, net_params, t, 2) for t in (0, 2, 3)]
  assert untrained[0] == untrained[1] and 'conv1/kernel' in untrained[0] and not untrained[2]


def test_lr_multipliers(net_params):
  cfg = optim.default_optimizer_config()
  cfg.update(dict(momentum=0.0, lr=0.1, lr_multipliers=('layer1_0/bn.*=0.5', 'layer1_0=0.1')))
  (p0, p1), _, _ = _run(cfg, net_params, 1)
  for path, new in flat(p1).items():
    factor = 0.5 if path.startswith('layer1_0/bn') else 0.1 if path.startswith('layer1_0') else 1.0
    np.testing.assert_allclose(new - flat(p0)[path], -0.1 * 0.5 * factor, rtol=1e-5, atol=1e-6,
                               err_msg=path)


# --------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize('opt,sched,match', [
    (dict(name='lion'), None, r"Unknown optimizer 'lion'; valid names: sgd, adam, adamw, lars"),
    (dict(name='lamb', weight_decay_mode='coupled'), None, r"lamb places its weight decay"),
    (dict(name='lars', trust_coefficient=0.0), None, r'trust_coefficient=0.0 is out of range'),
    (None, dict(name='cosin'), r"Unknown schedule 'cosin'; valid names: constant, step"),
    (dict(frozen=('layer9',)), None, r"optimizer.frozen pattern 'layer9' matches no parameter"),
    (dict(frozen=('.*',)), None, r'freeze every parameter'),
    (dict(trainable=('head',)), None, r"optimizer.trainable pattern 'head' matches no parameter"),
    (dict(lr_multipliers=('fc',)), None, r"lr_multipliers entry 'fc' must look like"),
    (dict(lr_multipliers=('body=0.1',)), None, r"lr_multipliers pattern 'body' matches no"),
    (dict(frozen=('fc[',)), None, r"'fc\[' is not a valid regular expression"),
    (dict(lr_rate=0.1), None, r"Unknown optimizer config key 'lr_rate'"),
    (dict(lr='fast'), None, r"optimizer config key 'lr' must be of type float, got 'fast'"),
    (None, dict(name='step', step_epochs=0.0), r'must be at least one step long'),
    (dict(name='adamw', weight_decay_mode='coupled'), None, r"use name='adam'"),
    (dict(weight_decay_mode='l2'), None, r"Unknown weight_decay_mode 'l2'"),
    (dict(momentum=0.0, nesterov=True), None, r'nesterov=True needs'),
    (dict(lr=-1.0), None, r'lr=-1.0 is out of range'),
    (dict(unfreeze_after_epochs=1.0), None, r'needs frozen or trainable patterns'),
    (None, dict(name='onecycle', warmup_epochs=1.0), r'set warmup_epochs=0'),
    (None, dict(name='piecewise'), r'needs boundaries_epochs'),
    (None, dict(name='piecewise', boundaries_epochs=(3.0, 2.0)), r'must increase'),
    (None, dict(name='warmup_cosine'), r'needs warmup_epochs > 0'),
    (None, dict(warmup_epochs=50.0), r'shorter than training'),
])
def test_bad_config_errors(net_params, opt, sched, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(opt, sched, 2, 8, net_params)
