"""PyTorch side of the benchmark for one model, in its own process: eager and channels_last.

The models are PyTorch's own definitions of the same networks: the CIFAR-10 tutorial net and
LeNet-5 written as in PyTorch's tutorials, and the ResNets built from torchvision's
``BasicBlock`` (torchvision's ``resnet18`` with the CIFAR 3x3 stem for ``cifar_resnet18``). Their
parameter counts are reported so the orchestrator can check they match cnnjax's.

One training step = zero_grad, uint8 -> normalized float input, forward, cross-entropy, backward,
SGD(momentum 0.9) step, exactly what cnnjax's jitted step does. Evaluation runs under
``torch.inference_mode()``. Threads: ``torch.set_num_threads(--threads)`` (default: all cores).
Memory: glibc malloc set as ``cnnjax.configure_cpu()`` sets it for the JAX side
(`cnnjax.runtime.keep_freed_memory`), so that the two sides differ only in their frameworks.

Run by bench.py; by hand: ``python benchmarks/torch_worker.py --model lenet5``.
"""
from __future__ import annotations

import argparse
import os

from cnnjax.runtime import keep_freed_memory

keep_freed_memory()   # before torch allocates anything, as run.py's configure_cpu() does for JAX
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (MODELS, NUM_CLASSES, emit, load_average, peak_rss_mb, reset_peak_rss,
                    summarize, time_steps)


class TutorialNet(nn.Module):
  def __init__(self, in_channels=3, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, 6, 5)
    self.conv2 = nn.Conv2d(6, 16, 5)
    self.fc1 = nn.Linear(16 * 5 * 5, 120)
    self.fc2 = nn.Linear(120, 84)
    self.fc3 = nn.Linear(84, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    x = torch.flatten(x, 1)
    return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
  def __init__(self, in_channels=1, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
    self.conv2 = nn.Conv2d(6, 16, 5)
    self.fc1 = nn.Linear(16 * 5 * 5, 120)
    self.fc2 = nn.Linear(120, 84)
    self.fc3 = nn.Linear(84, num_classes)

  def forward(self, x):
    x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
    x = F.avg_pool2d(torch.tanh(self.conv2(x)), 2)
    x = torch.flatten(x, 1)
    return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def small_resnet(in_channels=3, num_classes=10):
  """3x3 stem 64, stages of 64/128/256 channels with 2 torchvision BasicBlocks each, GAP, fc."""
  from torchvision.models.resnet import BasicBlock
  layers = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
  inplanes = 64
  for i, planes in enumerate((64, 128, 256)):
    for j in range(2):
      stride = 2 if i > 0 and j == 0 else 1
      downsample = None
      if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes))
      layers.append(BasicBlock(inplanes, planes, stride, downsample))
      inplanes = planes
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
  return nn.Sequential(*layers)


def cifar_resnet18(in_channels=3, num_classes=10):
  """torchvision's resnet18 with the CIFAR stem: 3x3 stride-1 conv1 and no max pool."""
  from torchvision.models import resnet18
  model = resnet18(num_classes=num_classes)
  model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
  model.maxpool = nn.Identity()
  return model


BUILDERS = {'tutorial_net': TutorialNet, 'lenet5': LeNet5, 'small_resnet': small_resnet,
            'cifar_resnet18': cifar_resnet18}


def measure(name: str, channels_last: bool, batch: int, steps: int, warmup: int,
            budget: float | None) -> dict:
  torch.manual_seed(0)
  h, w, c = MODELS[name]
  model = BUILDERS[name](in_channels=c, num_classes=NUM_CLASSES)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  images = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8).contiguous(memory_format=fmt)
  labels = torch.randint(0, NUM_CLASSES, (batch,))
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  losses = []

  def train_once():
    opt.zero_grad(set_to_none=True)
    x = (images.float() - 127.5) / 64.0
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    opt.step()
    losses.append(loss.item())

  model.train()
  reset_peak_rss()
  load = load_average()
  result = {'train': summarize(time_steps(train_once, steps, warmup, budget), batch),
            'load_average_before': load,
            'peak_rss_mb': peak_rss_mb(), 'losses': losses[:3] + losses[-1:]}
  model.eval()

  def eval_once():
    with torch.inference_mode():
      model((images.float() - 127.5) / 64.0).argmax(-1)

  result['eval'] = summarize(time_steps(eval_once, steps, warmup, budget), batch)
  result['load_average_after'] = load_average()
  result['params'] = sum(p.numel() for p in model.parameters())
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', required=True, choices=sorted(MODELS))
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--budget', type=float, default=None, help='seconds per measurement (at least 5 steps)')
  p.add_argument('--threads', type=int, default=os.cpu_count())
  p.add_argument('--layouts', default='eager,channels_last')
  args = p.parse_args(argv)
  torch.set_num_threads(args.threads)
  result = {'model': args.model, 'torch': torch.__version__, 'threads': args.threads}
  for layout in args.layouts.split(','):
    result[layout] = measure(args.model, layout == 'channels_last', args.batch, args.steps,
                             args.warmup, args.budget)
  emit(result)


if __name__ == '__main__':
  main()
