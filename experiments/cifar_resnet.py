"""small_resnet on CIFAR-10: SGD 0.1, momentum 0.9, weight decay 5e-4, cosine over 200 epochs, crop + flip.

Command:  python run.py --experiment cifar_resnet     (needs CIFAR-10 prepared by tfds; see README)
Expected: about 93% top-1 on the CIFAR-10 test set (the usual result for a ResNet of this size
          with this recipe; not measured here: CIFAR-10 cannot be downloaded offline, and 200
          epochs take days on a 2-core CPU — use a GPU/TPU, e.g. notebooks/colab_tpu.ipynb).
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'small_resnet'
  config.data.name = 'cifar10'
  config.data.crop_padding = 4
  config.data.flip = True
  config.optimizer.name = 'sgd'
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4     # coupled (L2), like torch.optim.SGD
  config.schedule.name = 'cosine'
  config.train.batch_size = 128
  config.train.num_epochs = 200
  config.train.log_every_steps = 100
  return config
