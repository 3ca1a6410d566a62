"""ConvNeXt-T on ImageNet with the ConvNeXt paper's recipe: AdamW 4e-3 at batch 4096 (4
accumulated micro-batches), RandAugment, mixup/cutmix, random erasing, drop path 0.1, an
evaluated weight EMA, 300 epochs.

Recipe (Liu et al. 2022, "A ConvNet for the 2020s", facebookresearch/ConvNeXt main.py defaults
and TRAINING.md's single-machine command `--batch_size 128 --update_freq 4` on 8 GPUs): AdamW,
lr 4e-3 at batch 4096, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 (decoupled; none on
biases and normalization parameters), 20 linear warmup epochs then cosine to 1e-6 (1/4000 of
the peak), 300 epochs, label smoothing 0.1, stochastic depth 0.1 (torchvision's default for
convnext_tiny, linear over the blocks), layer scale initialized to 1e-6, model EMA with decay
0.9999 evaluated alongside the trained weights (`--model_ema true --model_ema_eval true`).
`train.accumulate_steps=4` runs each batch of 4096 as 4 micro-batches of 1024 (128 per TPU
core, as the paper's 128 per GPU); on 32 cores or more set it to 1: the training is the same
(ConvNeXt has LayerNorm, not BatchNorm, so accumulation is exact).

Data side (main.py's defaults): RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25 in
'pixel' mode (timm's per-pixel N(0, 1)), mixup 0.8 or cutmix 1.0 (one of the two per batch,
switch probability 0.5, every batch mixed), label smoothing 0.1 folded into the mixed targets.
timm's magnitude 9 of 10 is bin 27 of torchvision's 31 (0-30: the same rotation, shear,
translation and enhancement strengths), so `data.randaugment = (2, 27)`. Where cnnjax differs:
its RandAugment is torchvision's (every op applied, Identity among the 14; timm applies each op
with probability 0.5, has Invert and SolarizeAdd and posterizes down to 1 bit), with a fixed
magnitude (no mstd0.5 jitter) and nearest interpolation; resizing is bilinear (the paper's
bicubic); one mixup/cutmix draw covers the whole batch of 4096 (the paper's, each GPU's 128).

Command:  python run.py --experiment imagenet_convnext_tiny   (data as imagenet_resnet50)
Expected: the paper's 82.1% top-1 — a reference, not measured here (no ImageNet and no
          accelerator on this project's machines); the differences above may cost some of it.
          On torchvision's layer_scale (shape (C,1,1) there, (C,) here) the official code
          applies no weight decay; cnnjax decays it (its name is neither 'bias' nor 'scale').
"""
from cnnjax.config import base_config, load_experiment


def get_config():
  config = base_config()
  config.model.name = 'convnext_tiny'
  config.model.dtype = 'bfloat16'
  config.model.kwargs.stochastic_depth_prob = 0.1
  config.data = load_experiment('imagenet_resnet50').data   # streamed, 224 px, flip, mean/std
  config.data.randaugment = (2, 27)    # timm's rand-m9 (magnitude 9 of 10 = bin 27 of 0-30)
  config.data.random_erasing = 0.25
  config.data.random_erasing_mode = 'pixel'
  config.data.mixup_alpha = 0.8
  config.data.cutmix_alpha = 1.0
  config.optimizer.name = 'adamw'
  config.optimizer.lr = 4e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.decay_bn_and_bias = False
  config.schedule.name = 'warmup_cosine'
  config.schedule.warmup_epochs = 20.0
  config.schedule.final_fraction = 1e-6 / 4e-3
  config.train.batch_size = 4096
  config.train.accumulate_steps = 4
  config.train.num_epochs = 300
  config.train.label_smoothing = 0.1
  config.train.ema_decay = 0.9999
  config.train.eval_batch_size = 1000
  config.train.log_every_steps = 50
  return config
