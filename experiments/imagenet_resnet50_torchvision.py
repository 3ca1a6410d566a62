"""ResNet-50 on ImageNet with torchvision's 2021 "new training recipe" (ResNet50_Weights
.IMAGENET1K_V2): TrivialAugment, random erasing, mixup/cutmix, label smoothing, a weight EMA,
600 epochs. Streamed.

Recipe (pytorch/vision issue 3995 and references/classification/train.py: `--batch-size 128`
on 8 GPUs `--lr 0.5 --lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method
linear --auto-augment ta_wide --epochs 600 --random-erase 0.1 --weight-decay 0.00002
--norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0
--train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4`): SGD with
momentum 0.9, lr 0.5 at batch 1024, 5 linear warmup epochs from 1% then cosine, weight decay
2e-5 (coupled, none on normalization parameters), random-resized crops + flip, then
TrivialAugmentWide, RandomErasing(p=0.1) after normalization, mixup (0.2) or cutmix (1.0), one
of the two per batch, label smoothing 0.1 in the mixed targets; test: resize 232, center-crop
224. EMA: torchvision averages every 32 steps with decay 1 - 2e-5 x 1024 x 32 / 600 (its
"adjust"), i.e. 0.99996585 per step, which cnnjax applies after every step.

Where cnnjax differs from that command: it trains at 224 px, not 176 (one image_size for train
and test here; 224 costs ~1.6x the compute), has no repeated-augmentation sampler (ra-reps 4),
applies TrivialAugment with nearest interpolation (torchvision's transform default; the recipe
passes bilinear), pairs mixed images as timm does (i with N-1-i; torchvision's v2 MixUp/CutMix
roll by one), warms the learning rate up per step rather than per epoch, does not reset the EMA
during the warmup epochs, exempts biases from weight decay as well as normalization parameters,
and computes in bfloat16 on TPUs.

Command:  python run.py --experiment imagenet_resnet50_torchvision   (data as imagenet_resnet50)
Expected: torchvision's published result for its exact recipe is 80.858% top-1 (95.434% top-5)
          — a reference, not measured here (no ImageNet and no accelerator on this project's
          machines); the differences above probably cost a few tenths of a point. Compare
          test_accuracy with test_ema_accuracy (the EMA's) in metrics.jsonl.
"""
from cnnjax.config import load_experiment

EPOCHS = 600
BATCH = 1024
TORCHVISION_EMA = 1 - (1 - 0.99998) * BATCH * 32 / EPOCHS   # per update, one every 32 steps


def get_config():
  config = load_experiment('imagenet_resnet50')   # data, mean/std, model, bfloat16, batch 1024
  config.model.kwargs.zero_init_residual = False  # torchvision's default
  config.data.eval_crop_fraction = 224 / 232
  config.data.trivialaugment = True
  config.data.random_erasing = 0.1
  config.data.mixup_alpha = 0.2
  config.data.cutmix_alpha = 1.0
  config.train.label_smoothing = 0.1
  config.optimizer.nesterov = False
  config.train.batch_size = BATCH
  config.optimizer.lr = 0.5
  config.optimizer.weight_decay = 2e-5
  config.optimizer.decay_bn_and_bias = False
  config.schedule.name = 'warmup_cosine'
  config.schedule.warmup_epochs = 5.0
  config.schedule.warmup_start_factor = 0.01
  config.train.num_epochs = EPOCHS
  config.train.ema_decay = TORCHVISION_EMA ** (1 / 32)
  return config
