"""ResNet-18 (CIFAR stem: 3x3 conv, no max pool) on CIFAR-10, SGD 0.1 + cosine over 200 epochs.

Command:  python run.py --experiment cifar_resnet18   (needs CIFAR-10 prepared by tfds; see README)
Expected: about 95% top-1 on the CIFAR-10 test set (kuangliu/pytorch-cifar reports 95.4% for
          this model and recipe); not measured here: CIFAR-10 cannot be downloaded offline.
"""
from cnnjax.config import load_experiment


def get_config():
  config = load_experiment('cifar_resnet')   # the same CIFAR-10 recipe, another network
  config.model.name = 'cifar_resnet18'
  return config
