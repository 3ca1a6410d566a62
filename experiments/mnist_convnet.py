"""convnet (three 3x3 conv+BN+ReLU stages, global average pool, dropout) on MNIST, Adam 1e-3.

Command:  python run.py --experiment mnist_convnet    (needs MNIST prepared by tfds; see README)
Expected: about 99.3-99.5% top-1 on the MNIST test set after 10 epochs (typical for a small BN
          CNN; not measured here: MNIST cannot be downloaded offline).
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'convnet'
  config.data.name = 'mnist'
  config.optimizer.name = 'adam'
  config.optimizer.lr = 1e-3
  config.schedule.name = 'constant'
  config.train.batch_size = 128
  config.train.num_epochs = 10
  return config
