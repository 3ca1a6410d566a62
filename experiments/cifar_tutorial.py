"""The PyTorch CIFAR-10 tutorial's recipe: tutorial_net, SGD momentum 0.9, 2 epochs, at batch 8 and lr 0.002.

Command:  python run.py --experiment cifar_tutorial   (needs CIFAR-10 prepared by tfds; see README)
Batch:    the tutorial trains at batch 4 with lr 0.001; this experiment uses batch 8 with lr 0.002
          (the linear scaling rule: the same learning rate per example) so that its default batch
          divides over 1, 2, 4 and 8 devices (a Colab TPU has 8 cores). The tutorial verbatim, on
          up to 4 devices: --config.train.batch_size=4 --config.optimizer.lr=0.001.
Expected: about 54% top-1 on the 10,000 test images (the tutorial reports 54% at batch 4); not
          measured here: CIFAR-10 cannot be downloaded offline.
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'tutorial_net'
  config.data.name = 'cifar10'
  config.optimizer.name = 'sgd'
  config.optimizer.lr = 0.002               # the tutorial's 0.001 at batch 4, scaled to batch 8
  config.optimizer.momentum = 0.9
  config.schedule.name = 'constant'
  config.train.batch_size = 8               # the tutorial's 4 does not divide over 8 devices
  config.train.eval_batch_size = 500
  config.train.num_epochs = 2
  config.train.log_every_steps = 500
  return config
