"""ResNet-18 (CIFAR stem: 3x3 conv, no max pool) on CIFAR-10, SGD 0.1 + cosine over 200 epochs.

Command:  python run.py --experiment cifar_resnet18   (needs CIFAR-10 prepared by tfds; see README)
Expected: about 95% top-1 on the CIFAR-10 test set (kuangliu/pytorch-cifar reports 95.4% for
          this model and recipe); not measured here: CIFAR-10 cannot be downloaded offline.
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'cifar_resnet18'
  config.data.name = 'cifar10'
  config.data.crop_padding = 4
  config.data.flip = True
  config.optimizer.name = 'sgd'
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.train.batch_size = 128
  config.train.num_epochs = 200
  config.train.log_every_steps = 100
  return config
