"""The train state and the two pure, jit-compiled steps: `train_step` and `eval_step`.

`train_step(state, batch, recipe) -> (state, metrics)` reads top to bottom: derive this step's
random keys from the state, augment and normalize the uint8 batch on the device (then random
erasing and mixup/cutmix, whose mixed targets replace the labels in the loss), run the model
with batch statistics, take the gradient of the (label-smoothed) cross-entropy (plus
`recipe.aux_loss_weight` times that of each auxiliary classifier's logits the model sows into
its ``aux_logits`` collection, e.g. Inception v3's AuxLogits), apply the Optax
update, update the weights' moving average (`recipe.ema_decay`, cnnjax/ema.py), return the new
state. `recipe` is static (hashable) data: what the step does, not state.

Gradient accumulation (`recipe.accumulate_steps = k`): one call is still one optimizer step on
the whole batch, but the model runs on k micro-batches one after the other (`jax.lax.scan`), so
only one micro-batch's activations are alive at a time; the gradient is the mean of theirs, i.e.
the gradient of the whole batch's mean loss. Micro-batch i takes rows i, i + k, i + 2k, ... of
the (per-device) batch, so under a sharded batch every device holds its share of each. Step
counts, schedules, data order and checkpoints are those of the large batch. BatchNorm caveat:
each micro-batch is normalized with its own statistics and the running statistics are updated
k times per step (as in PyTorch with accumulation), so a model with BatchNorm does not train
exactly like one batch of k times the size; a model without it does (to rounding).

BatchNorm uses batch statistics in training and the running statistics in evaluation. Under
`jax.jit` with a batch sharded over a mesh, those statistics are global across devices; under
`jax.pmap` set `recipe.axis_name` so gradients and statistics are averaged across devices.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnnjax import ema as ema_lib
from cnnjax import freezing, runtime
from cnnjax.data import augment, autoaugment, mixing
from cnnjax.errors import BatchSplitError

Batch = dict  # {'image': uint8 (N, H, W, C), 'label': int32 (N,), optional 'mask': bool (N,)}


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run carries from one step to the next."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # the run's base key; each step folds its step number in
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema: Any = None  # {'params', 'batch_stats'}: their moving average (cnnjax/ema.py), or None


@dataclasses.dataclass(frozen=True)
class StepRecipe:
  """What a step does, fixed for a run (a static argument of the compiled steps)."""
  mean: tuple[float, ...]           # per-channel, in [0, 255] units
  std: tuple[float, ...]
  crop_padding: int = 0
  pad_mode: str = 'constant'
  flip: bool = False
  label_smoothing: float = 0.0
  eval_flip_tta: bool = False       # evaluate on the mean logits of each image and its mirror
  frozen: tuple[str, ...] = ()      # param paths with no gradient (freezing.untrained_paths)
  axis_name: str | None = None      # set under pmap
  augment_policy: autoaugment.Policy | None = None  # RandAugment / TrivialAugment, on uint8
  random_erasing: float = 0.0       # probability per image, after normalization
  random_erasing_mode: str = 'zero'  # 'zero' (torchvision's value=0) | 'pixel' (timm: N(0, 1))
  mixing: mixing.MixSpec | None = None  # mixup / cutmix of the batch and its soft targets
  accumulate_steps: int = 1         # micro-batches per optimizer step (1 = the whole batch at once)
  ema_decay: float = 0.0            # > 0: update state.ema after every step (cnnjax/ema.py)
  ema_warmup_power: float = 0.0     # > 0: timm ModelEmaV3's decay warmup with this power
  aux_loss_weight: float = 0.4      # times each auxiliary classifier's loss (models that sow one)


def init_variables(model: nn.Module, image_shape: tuple[int, ...], rng: jax.Array) -> dict:
  """The model's `params` and `batch_stats`, initialized on a dummy batch of one image.

  Init runs once, so on the CPU it is compiled without XLA's backend optimizations: the same
  values, compiled 3-4x faster (12.6 s -> 3.3 s for small_resnet on 2 cores).
  """
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return jax.jit(functools.partial(model.init, train=False), compiler_options=options)(
      {'params': rng}, jnp.zeros((1, *image_shape), jnp.float32))


def create_train_state(model: nn.Module, variables: dict, tx: optax.GradientTransformation,
                       rng: jax.Array, ema: bool = False) -> TrainState:
  """Step 0; with `ema=True` the moving average starts as a copy of `variables`."""
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=rng, apply_fn=model.apply, tx=tx,
                    ema=ema_lib.init(variables) if ema else None)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels, or against
  soft targets of the logits' shape as they are (mixup/cutmix: smoothing already folded in)."""
  if labels.ndim == logits.ndim:
    return optax.softmax_cross_entropy(logits, labels)
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits, per example."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch: Batch, recipe: StepRecipe) -> tuple[TrainState, dict]:
  aug_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  first_index = 0  # of this device's slice in the global batch: the same augmentation under pmap
  if recipe.axis_name is not None:
    first_index = jax.lax.axis_index(recipe.axis_name) * batch['image'].shape[0]
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(recipe.axis_name))
  images = augment.apply(aug_rng, batch['image'], crop_padding=recipe.crop_padding,
                         pad_mode=recipe.pad_mode, flip=recipe.flip, policy=recipe.augment_policy,
                         first_index=first_index)
  images = augment.normalize(images, recipe.mean, recipe.std)
  images = augment.random_erasing(jax.random.fold_in(aug_rng, augment.ERASING_STREAM), images,
                                  recipe.random_erasing, recipe.random_erasing_mode, first_index)
  labels = batch['label']
  targets = labels  # what the loss fits; accuracy is always measured against `labels`
  if recipe.mixing is not None:
    images, targets = mixing.apply(jax.random.fold_in(aug_rng, mixing.STREAM), images, labels,
                                   recipe.mixing, recipe.label_smoothing, recipe.axis_name)
  trainable, fixed = freezing.split(state.params, recipe.frozen)

  def loss_fn(trainable, batch_stats, images, targets, dropout_rng):
    params = freezing.merge(trainable, fixed)
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        rngs={'dropout': dropout_rng}, mutable=['batch_stats', 'aux_logits'])
    logits = logits.astype(jnp.float32)
    loss = cross_entropy(logits, targets, recipe.label_smoothing).mean()
    for aux in jax.tree.leaves(updates.get('aux_logits', {})):  # auxiliary classifiers' logits
      loss += recipe.aux_loss_weight * cross_entropy(aux.astype(jnp.float32), targets,
                                                     recipe.label_smoothing).mean()
    return loss, (logits, updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if recipe.accumulate_steps == 1:
    (loss, (logits, batch_stats)), grads = grad_fn(trainable, state.batch_stats, images, targets,
                                                   dropout_rng)
  else:
    loss, logits, batch_stats, grads = _accumulate(grad_fn, trainable, state.batch_stats,
                                                   (images, targets), dropout_rng,
                                                   recipe.accumulate_steps)
  grads = freezing.merge(grads, jax.tree.map(jnp.zeros_like, fixed))
  metrics = {'loss': loss,
             'accuracy': topk_correct(logits, labels, 1).mean(),
             'top5_accuracy': topk_correct(logits, labels, 5).mean()}
  if recipe.axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), recipe.axis_name)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = optax.tree_utils.tree_norm(grads)
  ema = state.ema
  if recipe.ema_decay:
    decay = ema_lib.decay_at(state.step + 1, recipe.ema_decay, recipe.ema_warmup_power)
    ema = ema_lib.update(ema, params, batch_stats, decay)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema=ema)
  return new_state, metrics


def check_micro_batches(per_device: int, k: int, devices: int) -> None:
  """Raises BatchSplitError unless each device's batch splits into k equal micro-batches."""
  if per_device % k:
    multiple = devices * k
    suggestion = -(-per_device * devices // multiple) * multiple
    raise BatchSplitError(
        f'train.batch_size={per_device * devices} is {per_device} per device, which does not '
        f'split into train.accumulate_steps={k} micro-batches; set train.batch_size to a '
        f'multiple of {multiple}, e.g. train.batch_size={suggestion}.')


def micro_batches(x: jax.Array, k: int) -> jax.Array:
  """(k, n / k, ...): micro-batch i holds rows i, i + k, i + 2k, ... of x."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def _accumulate(grad_fn, trainable, batch_stats, inputs, dropout_rng, k):
  """(mean loss, logits in the batch's row order, batch_stats after the k micro-batches, mean
  gradient) of `grad_fn` over k micro-batches of `inputs`, run one after another."""
  def micro_step(carry, xs):
    grads_sum, batch_stats = carry
    index, micro = xs
    (loss, (logits, batch_stats)), grads = grad_fn(
        trainable, batch_stats, *micro, jax.random.fold_in(dropout_rng, index))
    return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, logits)

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  xs = (jnp.arange(k), jax.tree.map(lambda x: micro_batches(x, k), inputs))
  (grads_sum, batch_stats), (losses, logits) = jax.lax.scan(micro_step, (zeros, batch_stats), xs)
  logits = logits.swapaxes(0, 1).reshape(-1, logits.shape[-1])  # back to the rows' order
  grads = jax.tree.map(lambda g: g / k, grads_sum)
  return losses.mean(), logits, batch_stats, grads


def eval_logits(state: TrainState, images: jax.Array, recipe: StepRecipe) -> jax.Array:
  """Evaluation-mode logits of normalized images; with `recipe.eval_flip_tta`, the mean of the
  logits of each image and of its left-right mirror (flip test-time augmentation)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, images, train=False).astype(jnp.float32)
  if recipe.eval_flip_tta:
    mirrored = state.apply_fn(variables, images[:, :, ::-1], train=False).astype(jnp.float32)
    logits = 0.5 * (logits + mirrored)
  return logits


def eval_step(state: TrainState, batch: Batch, recipe: StepRecipe) -> dict:
  """Sums (not means) over the real examples of a batch, so padded rows count for nothing."""
  images = augment.normalize(batch['image'], recipe.mean, recipe.std)
  logits = eval_logits(state, images, recipe)
  labels = batch['label']
  mask = batch.get('mask', jnp.ones(labels.shape, bool)).astype(jnp.float32)
  sums = {'loss': jnp.sum(cross_entropy(logits, labels) * mask),
          'correct': jnp.sum(topk_correct(logits, labels, 1) * mask),
          'correct5': jnp.sum(topk_correct(logits, labels, 5) * mask),
          'count': jnp.sum(mask)}
  if recipe.axis_name is not None:
    sums = jax.lax.psum(sums, recipe.axis_name)
  return sums


jit_train_step = jax.jit(train_step, static_argnames='recipe', donate_argnames='state')
jit_eval_step = jax.jit(eval_step, static_argnames='recipe',
                        compiler_options=runtime.eval_compiler_options())
