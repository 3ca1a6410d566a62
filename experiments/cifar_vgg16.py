"""VGG-16 with batch norm on CIFAR-10, SGD 0.1 momentum 0.9 wd 5e-4, cosine over 200 epochs.

Command:  python run.py --experiment cifar_vgg16      (needs CIFAR-10 prepared by tfds; see README)
Expected: about 93-94% top-1 on the CIFAR-10 test set (kuangliu/pytorch-cifar reports 92.6% for
          its VGG-16; not measured here: CIFAR-10 cannot be downloaded offline).
Note:     torchvision's vgg16_bn layout (adaptive 7x7 pool + 4096-wide classifier), so 32x32
          inputs work and ImageNet weights port; the classifier dominates the parameter count.
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'vgg16_bn'
  config.data.name = 'cifar10'
  config.data.crop_padding = 4
  config.data.flip = True
  config.optimizer.name = 'sgd'
  config.optimizer.lr = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.train.batch_size = 128
  config.train.num_epochs = 200
  config.train.log_every_steps = 100
  return config
