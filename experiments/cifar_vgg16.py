"""VGG-16 with batch norm on CIFAR-10, SGD 0.1 momentum 0.9 wd 5e-4, cosine over 200 epochs.

Command:  python run.py --experiment cifar_vgg16      (needs CIFAR-10 prepared by tfds; see README)
Expected: about 93-94% top-1 on the CIFAR-10 test set (kuangliu/pytorch-cifar reports 92.6% for
          its VGG-16; not measured here: CIFAR-10 cannot be downloaded offline).
Note:     torchvision's vgg16_bn layout (adaptive 7x7 pool + 4096-wide classifier), so 32x32
          inputs work and ImageNet weights port; the classifier dominates the parameter count.
"""
from cnnjax.config import load_experiment


def get_config():
  config = load_experiment('cifar_resnet')   # the same CIFAR-10 recipe, another network
  config.model.name = 'vgg16_bn'
  config.optimizer.lr = 0.05
  return config
