"""ResNet-18 on ImageNet (ILSVRC-2012), streamed, with imagenet_resnet50's recipe.

The flax examples/imagenet recipe of `imagenet_resnet50` (Nesterov SGD 0.9, lr 0.1 x batch/256,
5 warmup epochs + cosine, 100 epochs, batch 1024, weight decay 1e-4 on kernels, zero-initialized
last BatchNorm of each block, bfloat16 compute; random-resized crop 224 + flip, resize 256 +
center crop 224) with torchvision's ResNet-18.

Command:  python run.py --experiment imagenet_resnet18     (data: as imagenet_resnet50)
Expected: about 70% top-1 on the validation images — a reference, not measured here:
          torchvision's ResNet-18 reaches 69.76% with its shorter 90-epoch step-decay recipe.
"""
from cnnjax.config import load_experiment


def get_config():
  config = load_experiment('imagenet_resnet50')   # the same recipe, another network
  config.model.name = 'resnet18'
  return config
