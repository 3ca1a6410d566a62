"""Fine-tune torchvision's ImageNet ResNet-18 on CIFAR-10 (needs the weights file and CIFAR-10).

Command:  python run.py --experiment cifar_transfer_resnet
            [--config.transfer.init_from=/path/to/resnet18-f37072fd.pth]   (or a .safetensors copy)
Weights:  torchvision's IMAGENET1K_V1 file, https://download.pytorch.org/models/resnet18-f37072fd.pth,
          read from torchvision's own cache ~/.cache/torch/hub/checkpoints/ by default (it is
          there if torchvision ever downloaded it); without it the run stops with a message saying
          where to get it and where to put it. .pth needs torch (read with weights_only=True);
          .safetensors does not.
Data:     CIFAR-10 prepared by tfds (see README); 32x32 images, normalized with CIFAR's statistics.
Recipe:   every layer from ImageNet except the new 10-class head `fc` (transfer.exclude),
          SGD momentum 0.9, lr 0.01 with the head at 10x (optimizer.lr_multipliers), cosine over
          15 epochs, weight decay 5e-4, random crop (pad 4) + flip, batch 128.
Expected: not measured here (neither CIFAR-10 nor the ImageNet weights are reachable offline).
          Note the ImageNet stem (7x7 stride 2 + max pool) leaves a 1x1 map at 32x32 input, so
          expect less than from the same network at ImageNet resolution.
"""
from cnnjax.config import load_experiment
from cnnjax.torchvision_weights import imagenet_weights_path


def get_config():
  config = load_experiment('cifar_resnet')   # CIFAR-10 data, crop + flip, SGD + weight decay
  config.model.name = 'resnet18'
  config.transfer.init_from = imagenet_weights_path('resnet18')
  config.transfer.exclude = ('fc',)           # ImageNet's 1000-class head -> a fresh 10-class one
  config.optimizer.lr = 0.01
  config.optimizer.lr_multipliers = ('fc=10',)
  config.train.num_epochs = 15
  return config
