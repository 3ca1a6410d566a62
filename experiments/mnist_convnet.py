"""convnet (three 3x3 conv+BN+ReLU stages, global average pool, dropout) on MNIST, Adam 1e-3.

Command:  python run.py --experiment mnist_convnet    (needs MNIST prepared by tfds; see README)
Expected: about 99.3-99.5% top-1 on the MNIST test set after 10 epochs (typical for a small BN
          CNN; not measured here: MNIST cannot be downloaded offline).
"""
from cnnjax.config import load_experiment


def get_config():
  config = load_experiment('mnist_lenet')    # the same MNIST recipe, another network
  config.model.name = 'convnet'
  return config
