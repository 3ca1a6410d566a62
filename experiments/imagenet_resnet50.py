"""ResNet-50 on ImageNet (ILSVRC-2012), the google/flax examples/imagenet recipe, streamed.

Recipe (flax's configs/tpu.py + train.py): SGD with Nesterov momentum 0.9, learning rate
0.1 x batch / 256 = 0.4, 5 warmup epochs from 0 then cosine to 0, 100 epochs, batch 1024,
L2 weight decay 1e-4 on the kernels (not on biases or BatchNorm), the last BatchNorm scale of
every block initialized to zero, bfloat16 compute (parameters stay float32). Data: random-
resized crops (scale 0.08-1, ratio 3/4-4/3) to 224 + horizontal flip; test: resize the short side
to 256, center-crop 224; normalized by ImageNet's mean and std.

Command:  python run.py --experiment imagenet_resnet50
          needs imagenet2012 prepared as array_record under $TFDS_DATA_DIR (README, "Your own
          data"), or --config.data.name=folder:/path/ILSVRC2012 with train/ and val/ folders.
          On a CPU, --config.model.dtype=float32 (XLA:CPU's bfloat16 convolutions are slow).
Expected: the flax example's published result is 76.3% top-1 on the 50,000 validation images
          (TPU v3-8, 4.4 h for the 100 epochs) — a reference, not measured here (this project's
          machines have no ImageNet and no accelerator).
"""
from cnnjax.config import base_config

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # flax's input_pipeline.MEAN_RGB
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def get_config():
  config = base_config()
  config.model.name = 'resnet50'
  config.model.dtype = 'bfloat16'
  config.model.kwargs.zero_init_residual = True   # flax: scale_init=zeros on each block's last BN
  # The data side; imagenet_convnext_tiny and imagenet_resnet50_lamb take this config.data.
  config.data.name = 'tfds:imagenet2012'
  config.data.image_size = 224
  config.data.flip = True
  config.data.mean, config.data.std = IMAGENET_MEAN, IMAGENET_STD
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.train.batch_size = 1024
  config.optimizer.lr = 0.1 * config.train.batch_size / 256
  config.optimizer.weight_decay = 1e-4          # coupled: flax adds 1e-4 * 0.5 * |w|^2 to the loss
  config.optimizer.decay_bn_and_bias = False    # flax decays only parameters with ndim > 1
  config.schedule.name = 'warmup_cosine'
  config.schedule.warmup_epochs = 5.0
  config.train.num_epochs = 100
  config.train.eval_batch_size = 1000
  config.train.log_every_steps = 100
  return config
