"""The PyTorch CIFAR-10 tutorial, verbatim: tutorial_net, SGD lr 0.001 momentum 0.9, batch 4, 2 epochs.

Command:  python run.py --experiment cifar_tutorial   (needs CIFAR-10 prepared by tfds; see README)
Expected: about 54% top-1 on the 10,000 test images (the tutorial reports 54%); not measured
          here: CIFAR-10 cannot be downloaded offline.
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'tutorial_net'
  config.data.name = 'cifar10'
  config.optimizer.name = 'sgd'
  config.optimizer.lr = 0.001
  config.optimizer.momentum = 0.9
  config.schedule.name = 'constant'
  config.train.batch_size = 4
  config.train.eval_batch_size = 500
  config.train.num_epochs = 2
  config.train.log_every_steps = 500
  return config
