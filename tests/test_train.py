"""The pure train/eval steps: overfitting, BN modes, label smoothing, freezing, mixed precision."""
import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import data, freezing, models, optim, train
from cnnjax.config import base_config


@pytest.fixture(scope='module')
def digits():
  ds = data.load_dataset('mnist5k')
  return ds, {'image': ds.x_train[:32], 'label': ds.y_train[:32]}


def _state(model_name, ds, opt_cfg=None, dtype=jnp.float32, seed=0):
  model = models.get_model(model_name, num_classes=10, in_channels=1, dtype=dtype)
  variables = train.init_variables(model, ds.x_train.shape[1:], jax.random.key(seed))
  cfg = base_config()
  if opt_cfg:
    cfg.optimizer.update(opt_cfg)
  tx, _ = optim.make_optimizer(cfg.optimizer, cfg.schedule, 10, 100, variables['params'])
  return train.create_train_state(model, variables, tx, jax.random.key(seed + 1))


def test_overfits_one_batch_and_updates_bn_stats(digits):
  ds, batch = digits
  state = _state('convnet', ds, {'name': 'adam', 'lr': 3e-3})
  recipe = train.StepRecipe(mean=ds.mean, std=ds.std)
  stats0 = jax.device_get(state.batch_stats)
  losses = []
  for _ in range(60):
    state, metrics = train.jit_train_step(state, batch, recipe)
    losses.append(float(metrics['loss']))
  assert losses[0] > 1.5                       # ~ln(10) at the start
  assert losses[-1] < 0.05, losses[-10:]
  assert float(metrics['accuracy']) == 1.0
  assert int(state.step) == 60
  # BatchNorm running statistics moved away from their (0, 1) initial values.
  assert not np.allclose(stats0['bn1']['mean'], state.batch_stats['bn1']['mean'])
  # Evaluation uses the running statistics: the eval step equals a plain eval-mode apply.
  sums = train.jit_eval_step(state, {**batch, 'mask': np.ones(32, bool)}, recipe)
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          data.augment.normalize(batch['image'], ds.mean, ds.std), train=False)
  expected = np.sum(np.argmax(logits, -1) == batch['label'])
  assert float(sums['correct']) == expected
  assert float(sums['count']) == 32


def test_eval_step_compiler_options_change_speed_not_results(digits):
  # jit_eval_step is compiled with cnnjax.runtime's eval options (fewer YNNPACK fusions on
  # jaxlib 0.10): the same sums as a plain jax.jit of eval_step, with and without the BN sums.
  ds, batch = digits
  state = _state('convnet', ds)
  for _ in range(2):  # move the BN running statistics off their initial values
    state, _ = train.jit_train_step(state, batch, train.StepRecipe(mean=ds.mean, std=ds.std))
  recipe = train.StepRecipe(mean=ds.mean, std=ds.std)
  plain = jax.jit(train.eval_step, static_argnames='recipe')(state, batch, recipe)
  chex.assert_trees_all_close(train.jit_eval_step(state, batch, recipe), plain, rtol=1e-5)


def test_eval_compiler_options_are_for_the_cpu_only(monkeypatch):
  from cnnjax import runtime
  assert runtime.eval_compiler_options('tpu') is None and runtime.eval_compiler_options('gpu') is None
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')   # an accelerator first: nothing CPU-specific
  assert runtime.eval_compiler_options() is None
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert runtime.eval_compiler_options() == runtime.eval_compiler_options('cpu')


def test_eval_step_ignores_masked_rows(digits):
  ds, batch = digits
  state = _state('lenet5', ds)
  recipe = train.StepRecipe(mean=ds.mean, std=ds.std)
  mask = np.arange(32) < 20
  full = train.jit_eval_step(state, {**batch, 'mask': mask}, recipe)
  # Rows 20+ replaced by garbage: the masked sums must not change.
  garbage = dict(batch, image=np.full_like(batch['image'], 255), label=np.zeros(32, np.int32))
  garbage['image'][:20] = batch['image'][:20]
  garbage['label'][:20] = batch['label'][:20]
  masked = train.jit_eval_step(state, {**garbage, 'mask': mask}, recipe)
  chex.assert_trees_all_close(full, masked, rtol=1e-6)
  assert float(masked['count']) == 20


def test_cross_entropy_with_label_smoothing_matches_formula():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
  labels = jnp.array([0, 2])
  eps, k = 0.2, 3
  logp = jax.nn.log_softmax(logits)
  target = np.full((2, k), eps / k)
  target[np.arange(2), labels] += 1 - eps
  expected = -(target * logp).sum(-1)
  np.testing.assert_allclose(train.cross_entropy(logits, labels, eps), expected, rtol=1e-6)
  np.testing.assert_allclose(train.cross_entropy(logits, labels),
                             -logp[np.arange(2), labels], rtol=1e-6)


def test_topk_correct():
  logits = jnp.array([[0.1, 0.9, 0.5, 0.2, 0.0, 0.3], [1.0, 0.5, 0.4, 0.3, 0.2, 0.1]])
  labels = jnp.array([2, 5])
  np.testing.assert_array_equal(train.topk_correct(logits, labels, 1), [0.0, 0.0])
  np.testing.assert_array_equal(train.topk_correct(logits, labels, 2), [1.0, 0.0])
  np.testing.assert_array_equal(train.topk_correct(logits, labels, 5), [1.0, 0.0])
  np.testing.assert_array_equal(train.topk_correct(logits, jnp.array([4, 4]), 5), [0.0, 1.0])


def test_frozen_parameters_stay_bit_identical(digits):
  ds, batch = digits
  frozen_patterns = ('conv1', 'bn1', 'conv2')
  state = _state('convnet', ds, {'name': 'sgd', 'lr': 0.1, 'frozen': frozen_patterns,
                                 'weight_decay': 5e-4})
  frozen = freezing.untrained_paths({'frozen': frozen_patterns}, state.params)
  assert frozen and all(p.split('/')[0] in ('conv1', 'bn1', 'conv2') for p in frozen)
  recipe = train.StepRecipe(mean=ds.mean, std=ds.std, frozen=frozen)
  before = jax.tree.map(np.array, state.params)
  for _ in range(3):
    state, _ = train.jit_train_step(state, batch, recipe)
  after = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
  before = flax.traverse_util.flatten_dict(before, sep='/')
  for path in before:
    if path in frozen:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:
      assert not np.array_equal(after[path], before[path]), f'{path} did not train'


def test_bfloat16_compute_trains_with_float32_params(digits):
  ds, batch = digits
  state = _state('lenet5', ds, {'name': 'adam', 'lr': 3e-3}, dtype=jnp.bfloat16)
  recipe = train.StepRecipe(mean=ds.mean, std=ds.std)
  first = None
  for _ in range(30):
    state, metrics = train.jit_train_step(state, batch, recipe)
    first = first if first is not None else float(metrics['loss'])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  assert metrics['loss'].dtype == jnp.float32
  assert float(metrics['loss']) < 0.5 * first


def test_steps_are_deterministic_given_the_state(digits):
  ds, batch = digits
  recipe = train.StepRecipe(mean=ds.mean, std=ds.std, crop_padding=2, flip=True)
  outs = []
  for _ in range(2):
    state = _state('lenet5', ds, {'name': 'sgd', 'lr': 0.05})
    for _ in range(2):
      state, metrics = train.jit_train_step(state, batch, recipe)
    outs.append(jax.device_get((state.params, metrics)))
  chex.assert_trees_all_equal(outs[0], outs[1])


class _AuxNet(flax.linen.Module):
  """A body with an auxiliary classifier that sows its logits in training, as inception_v3's."""

  @flax.linen.compact
  def __call__(self, x, train=False):
    h = flax.linen.Dense(8, name='body')(x.reshape(x.shape[0], -1))
    aux = flax.linen.Dense(10, name='aux')(h)
    if train:
      self.sow('aux_logits', 'logits', aux)
    return flax.linen.Dense(10, name='fc')(jax.nn.relu(h))


def test_sown_aux_logits_add_their_weighted_loss_and_train_their_head():
  """loss = CE(logits) + aux_loss_weight * CE(aux) (torchvision's Inception recipe, 0.4 by
  default); with the weight 0 the aux head gets no gradient."""
  model = _AuxNet()
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (4, 4, 4, 1), dtype=np.uint8),
           'label': np.array([0, 3, 5, 9], np.int32)}
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  assert 'aux_logits' not in variables
  x = (batch['image'] - 100.0) / 50.0
  logits, sown = model.apply(variables, x, train=True, mutable=['aux_logits'])
  (aux,) = sown['aux_logits']['logits']
  main, aux_loss = (optax.softmax_cross_entropy_with_integer_labels(z, batch['label']).mean()
                    for z in (logits, aux))
  assert train.StepRecipe(mean=(0.,), std=(1.,)).aux_loss_weight == 0.4
  for weight, expected in ((0.4, main + 0.4 * aux_loss), (0.0, main)):
    state = train.create_train_state(model, jax.tree.map(jnp.copy, variables), optax.sgd(0.1),
                                     jax.random.key(1))  # a copy: the step donates the state
    recipe = train.StepRecipe(mean=(100.,), std=(50.,), aux_loss_weight=weight)
    state, metrics = train.jit_train_step(state, batch, recipe)
    np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
    moved = not np.allclose(state.params['aux']['kernel'], variables['params']['aux']['kernel'])
    assert moved == (weight > 0)
