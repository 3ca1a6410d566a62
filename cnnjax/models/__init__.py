"""The model zoo: every CNN by name, and the activations of any named layer.

>>> model = get_model('resnet18', num_classes=10)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
>>> logits = model.apply(variables, images)                     # eval mode
>>> feature_map = activations(model, variables, images, 'layer1_0')

Every model is a Flax Linen module with fields ``num_classes``, ``in_channels`` and ``dtype`` (the
compute dtype; parameters stay float32 and logits are returned as float32) and is called as
``model.apply(variables, x, train=False)`` on NHWC input. In training
(``train=True, mutable=['batch_stats'], rngs={'dropout': key}``) BatchNorm uses batch statistics
and updates its running ones, and dropout/stochastic depth draw from the 'dropout' rng.
Submodule names follow torchvision's state_dict keys (see cnnjax/models/common.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax

from cnnjax.errors import ConfigError
from cnnjax.models.airbench import Airbench94
from cnnjax.models.alexnet import AlexNet
from cnnjax.models.common import module_path
from cnnjax.models.convnext import (ConvNeXt, ConvNeXtBase, ConvNeXtLarge, ConvNeXtSmall,
                                    ConvNeXtTiny)
from cnnjax.models.densenet import DenseNet, DenseNet121, DenseNet161, DenseNet169, DenseNet201
from cnnjax.models.efficientnet import (EfficientNet, EfficientNetB0, EfficientNetB1,
                                        EfficientNetB2, EfficientNetB3, EfficientNetB4,
                                        EfficientNetB5, EfficientNetB6, EfficientNetB7,
                                        EfficientNetV2S, EfficientNetV2M, EfficientNetV2L)
from cnnjax.models.googlenet import GoogLeNet
from cnnjax.models.inception import InceptionV3
from cnnjax.models.lenet import LeNet5
from cnnjax.models.mnasnet import MNASNet, MNASNet0_5, MNASNet0_75, MNASNet1_0, MNASNet1_3
from cnnjax.models.mobilenet import MobileNetV2
from cnnjax.models.mobilenet_v3 import MobileNetV3, MobileNetV3Large, MobileNetV3Small
from cnnjax.models.regnet import REGNETS, RegNet
from cnnjax.models.resnet import (CifarResNet18, ResNet, ResNet18, ResNet34, ResNet50, ResNet101,
                                  ResNet152, ResNeXt50_32x4d, ResNeXt101_32x8d, ResNeXt101_64x4d,
                                  SmallResNet, WideResNet50_2, WideResNet101_2)
from cnnjax.models.shufflenet import (ShuffleNetV2, ShuffleNetV2x0_5, ShuffleNetV2x1_0,
                                      ShuffleNetV2x1_5, ShuffleNetV2x2_0)
from cnnjax.models.simple import ConvNet, MnistCNN, TutorialNet
from cnnjax.models.squeezenet import SqueezeNet, SqueezeNet1_0, SqueezeNet1_1
from cnnjax.models.vgg import (VGG, VGG11, VGG11BN, VGG13, VGG13BN, VGG16, VGG16BN, VGG19,
                               VGG19BN)

MODELS = {
    'tutorial_net': TutorialNet,
    'lenet5': LeNet5,
    'convnet': ConvNet,
    'mnist_cnn': MnistCNN,
    'alexnet': AlexNet,
    'vgg11': VGG11,
    'vgg13': VGG13,
    'vgg16': VGG16,
    'vgg19': VGG19,
    'vgg11_bn': VGG11BN,
    'vgg13_bn': VGG13BN,
    'vgg16_bn': VGG16BN,
    'vgg19_bn': VGG19BN,
    'googlenet': GoogLeNet,
    'inception_v3': InceptionV3,
    'resnet18': ResNet18,
    'resnet34': ResNet34,
    'resnet50': ResNet50,
    'resnet101': ResNet101,
    'resnet152': ResNet152,
    'resnext50_32x4d': ResNeXt50_32x4d,
    'resnext101_32x8d': ResNeXt101_32x8d,
    'resnext101_64x4d': ResNeXt101_64x4d,
    'wide_resnet50_2': WideResNet50_2,
    'wide_resnet101_2': WideResNet101_2,
    'cifar_resnet18': CifarResNet18,
    'small_resnet': SmallResNet,
    'efficientnet_b0': EfficientNetB0,
    'efficientnet_b1': EfficientNetB1,
    'efficientnet_b2': EfficientNetB2,
    'efficientnet_b3': EfficientNetB3,
    'efficientnet_b4': EfficientNetB4,
    'efficientnet_b5': EfficientNetB5,
    'efficientnet_b6': EfficientNetB6,
    'efficientnet_b7': EfficientNetB7,
    'efficientnet_v2_s': EfficientNetV2S,
    'efficientnet_v2_m': EfficientNetV2M,
    'efficientnet_v2_l': EfficientNetV2L,
    'mobilenet_v2': MobileNetV2,
    'mobilenet_v3_large': MobileNetV3Large,
    'mobilenet_v3_small': MobileNetV3Small,
    'squeezenet1_0': SqueezeNet1_0,
    'squeezenet1_1': SqueezeNet1_1,
    'shufflenet_v2_x0_5': ShuffleNetV2x0_5,
    'shufflenet_v2_x1_0': ShuffleNetV2x1_0,
    'shufflenet_v2_x1_5': ShuffleNetV2x1_5,
    'shufflenet_v2_x2_0': ShuffleNetV2x2_0,
    'mnasnet0_5': MNASNet0_5,
    'mnasnet0_75': MNASNet0_75,
    'mnasnet1_0': MNASNet1_0,
    'mnasnet1_3': MNASNet1_3,
    'densenet121': DenseNet121,
    'densenet161': DenseNet161,
    'densenet169': DenseNet169,
    'densenet201': DenseNet201,
    **REGNETS,
    'convnext_tiny': ConvNeXtTiny,
    'convnext_small': ConvNeXtSmall,
    'convnext_base': ConvNeXtBase,
    'convnext_large': ConvNeXtLarge,
    'airbench94': Airbench94,
}


def model_names() -> list[str]:
  """The names ``get_model`` accepts, in the order of ``MODELS``."""
  return list(MODELS)


def _model_class(constructor: Any) -> type[nn.Module]:
  while isinstance(constructor, functools.partial):
    constructor = constructor.func
  return constructor


def model_options(name: str) -> dict[str, Any]:
  """The keyword arguments model ``name`` accepts (its dataclass fields), with their defaults
  (``dataclasses.MISSING`` where there is none); a variant's own settings override the class's."""
  constructor = _lookup(name)
  options = {f.name: f.default if f.default is not dataclasses.MISSING else (
      f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
             for f in dataclasses.fields(_model_class(constructor))
             if f.init and f.name not in ('parent', 'name')}
  partials = []
  while isinstance(constructor, functools.partial):
    partials.append(constructor.keywords)
    constructor = constructor.func
  for keywords in reversed(partials):  # the outermost partial has the last word
    options.update({k: v for k, v in keywords.items() if k in options})
  return options


def _lookup(name: str) -> Any:
  if name not in MODELS:
    raise ConfigError(f'Unknown model {name!r}; valid names: {", ".join(MODELS)}.')
  return MODELS[name]


def get_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
              **kwargs: Any) -> nn.Module:
  """Builds model ``name``; ``None`` keeps the model's default class/channel count."""
  constructor = _lookup(name)
  options = model_options(name)
  for key in kwargs:
    if key not in options:
      raise ConfigError(f'Model {name!r} has no option {key!r}; valid options: '
                       f'{", ".join(options)}.')
  if num_classes is not None:
    kwargs['num_classes'] = num_classes
  if in_channels is not None:
    kwargs['in_channels'] = in_channels
  return constructor(**kwargs)


def layer_names(model: nn.Module, variables: Any, x: jax.Array) -> list[str]:
  """Every submodule path whose output ``activations`` can return, sorted (traced, not run)."""
  apply = functools.partial(model.apply, capture_intermediates=True, mutable=['intermediates'])
  _, state = jax.eval_shape(apply, variables, x)
  names = []

  def walk(tree, prefix):
    for key, value in tree.items():
      if key == '__call__':
        if prefix:
          names.append('/'.join(prefix))
      elif isinstance(value, Mapping):
        walk(value, prefix + (key,))
  walk(state['intermediates'], ())
  return names


def _parent(path: str) -> str:
  return path.rsplit('/', 1)[0] if '/' in path else ''


def activations(model: nn.Module, variables: Any, x: jax.Array, layer: str) -> jax.Array:
  """Output of submodule ``layer`` (e.g. 'layer1_0', 'features_3', 'inception3a/branch1') for
  input ``x`` in evaluation mode. Raises a ValueError listing valid layers for an unknown one."""
  path = module_path(layer)  # 'layer1_0/conv1' or torchvision's 'layer1.0.conv1'
  names = layer_names(model, variables, x)
  if path not in names:
    parent = _parent(path) if _parent(path) in names else ''
    options = [n for n in names if _parent(n) == parent]
    raise ConfigError(f'{type(model).__name__} has no layer {layer!r}; valid layers'
                     f'{" under " + repr(parent) if parent else ""}: {", ".join(options)}.')
  target = tuple(path.split('/'))
  _, state = model.apply(variables, x, mutable=['intermediates'],
                         capture_intermediates=lambda mdl, method: (
                             method == '__call__' and mdl.path == target))
  node = state['intermediates']
  for key in target:
    node = node[key]
  return node['__call__'][0]


__all__ = ['MODELS', 'model_names', 'model_options', 'get_model', 'layer_names', 'activations',
           'AlexNet', 'ConvNet', 'ConvNeXt', 'DenseNet', 'EfficientNet', 'GoogLeNet', 'InceptionV3',
           'LeNet5', 'MNASNet', 'MobileNetV2', 'MobileNetV3', 'RegNet', 'ResNet', 'ShuffleNetV2',
           'SqueezeNet', 'TutorialNet', 'VGG']
