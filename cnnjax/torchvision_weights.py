"""torchvision state_dicts -> cnnjax variables: one declarative name map and the tensor layouts.

A torchvision key maps by string rewriting (cnnjax's models mirror torchvision's module names, see
cnnjax/models/common.py): a Sequential index joins its container with '_' (``layer1.0.conv1`` ->
``layer1_0/conv1``, ``features.0`` -> ``features_0``), every other '.' is a Flax scope, and the
leaf is renamed by the kind of module it belongs to (`LEAVES`). The kind is read off the file
itself: a module with a ``running_mean`` is a BatchNorm, a 1-D ``weight`` without one a
LayerNorm (both map to ``scale``/``bias``), a 4-D ``weight`` a Conv2d, a 2-D one a Linear, and
ConvNeXt's ``layer_scale`` (C, 1, 1) becomes a (C,) parameter. Tensor layouts: Conv2d OIHW ->
HWIO, Linear (out, in) -> (in, out), and the first Linear after a flatten (`NCHW_FLATTEN`) gets
its input rows reordered from torch's C,H,W flatten order to cnnjax's H,W,C. Per-model fixes:
`KEY_RENAMES` (old DenseNet files) and `AUX_HEADS` (dropped auxiliary classifiers).

Files are read without unpickling arbitrary objects: ``.safetensors`` through safetensors' NumPy
reader (no torch needed), ``.pth``/``.pt`` only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np

from cnnjax.errors import CheckpointError
from cnnjax.models.common import module_path  # the naming rule of cnnjax.models

# (module kind, torch leaf) -> (cnnjax collection, cnnjax leaf name, layout conversion);
# None: the tensor is not used (BatchNorm's counter; cnnjax's momentum is fixed).
LEAVES = {
    ('conv', 'weight'): ('params', 'kernel', 'oihw_to_hwio'),
    ('conv', 'bias'): ('params', 'bias', None),
    ('linear', 'weight'): ('params', 'kernel', 'transpose'),
    ('linear', 'bias'): ('params', 'bias', None),
    ('bn', 'weight'): ('params', 'scale', None),
    ('bn', 'bias'): ('params', 'bias', None),
    ('bn', 'running_mean'): ('batch_stats', 'mean', None),
    ('bn', 'running_var'): ('batch_stats', 'var', None),
    ('bn', 'num_batches_tracked'): None,
    ('layer_scale', 'layer_scale'): ('params', 'layer_scale', 'flatten'),
}

# model name pattern -> (the Linear right after torch.flatten of an NCHW map, its (H, W)).
NCHW_FLATTEN = {
    r'vgg\d+(_bn)?': ('classifier_0', (7, 7)),
    r'alexnet': ('classifier_1', (6, 6)),
}

# model name pattern -> (regex, replacement) applied to every key first: torchvision's own
# renames of old checkpoints (DenseNet's pretrained files spell 'denselayer1.norm.1' for
# 'denselayer1.norm1', which its loader fixes with this same regex).
KEY_RENAMES = {
    r'densenet\d+': ((r'(denselayer\d+\.(?:norm|relu|conv))\.([12])\.', r'\1\2.'),),
}

# Auxiliary classifiers in torchvision's files that cnnjax's model does not have, so their
# tensors are dropped (and said so, see aux_heads): GoogLeNet's aux1/aux2 (cnnjax's googlenet is
# torchvision's without them, as its weights are published). Inception v3's AuxLogits is not
# here: cnnjax's inception_v3 has that head and imports it (aux_logits=False leaves the head
# out; then list AuxLogits in transfer.exclude).
AUX_HEADS = {'googlenet': ('aux1', 'aux2')}

SUFFIXES = ('.pth', '.pt', '.safetensors')

# torchvision's ImageNet weights (IMAGENET1K_V1; regnet_y_128gf has only SWAG_E2E_V1) for every
# zoo model whose file maps (mnasnet0_5's official file is a version-1 checkpoint with another
# stem, which torchvision patches in at load time; cnnjax does not).
IMAGENET_URL = 'https://download.pytorch.org/models/'
IMAGENET_FILES = {
    'resnet18': 'resnet18-f37072fd.pth', 'resnet34': 'resnet34-b627a593.pth',
    'resnet50': 'resnet50-0676ba61.pth', 'resnet101': 'resnet101-63fe2227.pth',
    'resnet152': 'resnet152-394f9c45.pth', 'alexnet': 'alexnet-owt-7be5be79.pth',
    'vgg11': 'vgg11-8a719046.pth', 'vgg13': 'vgg13-19584684.pth', 'vgg16': 'vgg16-397923af.pth',
    'vgg19': 'vgg19-dcbb9e9d.pth', 'vgg11_bn': 'vgg11_bn-6002323d.pth',
    'vgg13_bn': 'vgg13_bn-abd245e5.pth', 'vgg16_bn': 'vgg16_bn-6c64b313.pth',
    'vgg19_bn': 'vgg19_bn-c79401a0.pth',
    'resnext50_32x4d': 'resnext50_32x4d-7cdf4587.pth',
    'resnext101_32x8d': 'resnext101_32x8d-8ba56ff5.pth',
    'resnext101_64x4d': 'resnext101_64x4d-173b62eb.pth',
    'wide_resnet50_2': 'wide_resnet50_2-95faca4d.pth',
    'wide_resnet101_2': 'wide_resnet101_2-32ee1156.pth',
    'googlenet': 'googlenet-1378be20.pth', 'inception_v3': 'inception_v3_google-0cc3c7bd.pth',
    'mobilenet_v2': 'mobilenet_v2-b0353104.pth',
    'efficientnet_b0': 'efficientnet_b0_rwightman-7f5810bc.pth',
    'efficientnet_b1': 'efficientnet_b1_rwightman-bac287d4.pth',
    'efficientnet_b2': 'efficientnet_b2_rwightman-c35c1473.pth',
    'efficientnet_b3': 'efficientnet_b3_rwightman-b3899882.pth',
    'efficientnet_b4': 'efficientnet_b4_rwightman-23ab8bcd.pth',
    'efficientnet_b5': 'efficientnet_b5_lukemelas-1a07897c.pth',
    'efficientnet_b6': 'efficientnet_b6_lukemelas-24a108a5.pth',
    'efficientnet_b7': 'efficientnet_b7_lukemelas-c5b4e57e.pth',
    'efficientnet_v2_s': 'efficientnet_v2_s-dd5fe13b.pth',
    'efficientnet_v2_m': 'efficientnet_v2_m-dc08266a.pth',
    'efficientnet_v2_l': 'efficientnet_v2_l-59c71312.pth',
    'mobilenet_v3_large': 'mobilenet_v3_large-8738ca79.pth',
    'mobilenet_v3_small': 'mobilenet_v3_small-047dcff4.pth',
    'squeezenet1_0': 'squeezenet1_0-b66bff10.pth',
    'squeezenet1_1': 'squeezenet1_1-b8a52dc0.pth',
    'shufflenet_v2_x0_5': 'shufflenetv2_x0.5-f707e7126e.pth',
    'shufflenet_v2_x1_0': 'shufflenetv2_x1-5666bf0f80.pth',
    'shufflenet_v2_x1_5': 'shufflenetv2_x1_5-3c479a10.pth',
    'shufflenet_v2_x2_0': 'shufflenetv2_x2_0-8be3c8ee.pth',
    'mnasnet0_75': 'mnasnet0_75-7090bc5f.pth',
    'mnasnet1_0': 'mnasnet1.0_top1_73.512-f206786ef8.pth',
    'mnasnet1_3': 'mnasnet1_3-a4c69d6f.pth',
    'densenet121': 'densenet121-a639ec97.pth',
    'densenet161': 'densenet161-8d451a50.pth',
    'densenet169': 'densenet169-b2777c0a.pth',
    'densenet201': 'densenet201-c1103571.pth',
    'regnet_y_400mf': 'regnet_y_400mf-c65dace8.pth',
    'regnet_y_800mf': 'regnet_y_800mf-1b27b58c.pth',
    'regnet_y_1_6gf': 'regnet_y_1_6gf-b11a554e.pth',
    'regnet_y_3_2gf': 'regnet_y_3_2gf-b5a9779c.pth',
    'regnet_y_8gf': 'regnet_y_8gf-d0d0e4a8.pth',
    'regnet_y_16gf': 'regnet_y_16gf-9e6ed7dd.pth',
    'regnet_y_32gf': 'regnet_y_32gf-4dee3f7a.pth',
    'regnet_y_128gf': 'regnet_y_128gf_swag-c8ce3e52.pth',
    'regnet_x_400mf': 'regnet_x_400mf-adf1edd5.pth',
    'regnet_x_800mf': 'regnet_x_800mf-ad17e45c.pth',
    'regnet_x_1_6gf': 'regnet_x_1_6gf-e3633e7f.pth',
    'regnet_x_3_2gf': 'regnet_x_3_2gf-f342aeae.pth',
    'regnet_x_8gf': 'regnet_x_8gf-03ceed89.pth',
    'regnet_x_16gf': 'regnet_x_16gf-2007eb11.pth',
    'regnet_x_32gf': 'regnet_x_32gf-9d47f8d0.pth',
    'convnext_tiny': 'convnext_tiny-983f1562.pth', 'convnext_small': 'convnext_small-0c510722.pth',
    'convnext_base': 'convnext_base-6075fbad.pth', 'convnext_large': 'convnext_large-ea097f82.pth',
}
TORCH_HUB_DIR = '~/.cache/torch/hub/checkpoints'  # where torchvision itself caches them


def imagenet_weights_path(model_name: str) -> str:
  """Where torchvision caches `model_name`'s ImageNet weights (a default for configs)."""
  return f'{TORCH_HUB_DIR}/{IMAGENET_FILES[model_name]}'


def where_to_get(path: pathlib.Path, model_name: str) -> str:
  """A hint for a missing weights file: the official download and where to put it."""
  if model_name not in IMAGENET_FILES:
    return ''
  url = IMAGENET_URL + IMAGENET_FILES[model_name]
  return (f'; download torchvision\'s ImageNet weights for {model_name} from {url} '
          f'(e.g. curl -L --create-dirs -o {path} {url}) or point transfer.init_from at your copy')


def module_kinds(state_dict: dict[str, np.ndarray]) -> dict[str, str]:
  """torch module name -> 'bn' | 'conv' | 'linear', read off the tensors the module has."""
  kinds = {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition('.')
    if leaf == 'running_mean':
      kinds[module] = 'bn'
    elif leaf == 'layer_scale':  # ConvNeXt's CNBlock: a (C, 1, 1) parameter of its own
      kinds[module] = 'layer_scale'
    elif leaf == 'weight' and kinds.get(module) != 'bn':
      kinds[module] = {4: 'conv', 2: 'linear', 1: 'bn'}.get(len(value.shape), 'unknown')
  return kinds


def _flatten_layer(model_name: str) -> tuple[str, tuple[int, int]] | None:
  for pattern, entry in NCHW_FLATTEN.items():
    if re.fullmatch(pattern, model_name):
      return entry
  return None


def nchw_rows_to_nhwc(kernel: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Reorders the rows of an (in, out) kernel whose input was flattened C,H,W to H,W,C order."""
  h, w = hw
  if kernel.shape[0] % (h * w):
    raise CheckpointError(f'a Linear with {kernel.shape[0]} inputs cannot follow a flattened '
                           f'{h}x{w} feature map.')
  c = kernel.shape[0] // (h * w)
  return kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)


def aux_heads(state_dict: dict[str, np.ndarray], model_name: str) -> list[str]:
  """The auxiliary-classifier modules of `AUX_HEADS` present in ``state_dict`` (``convert``
  drops their tensors)."""
  return [head for head in AUX_HEADS.get(model_name, ())
          if any(key.startswith(head + '.') for key in state_dict)]


def convert(state_dict: dict[str, np.ndarray], model_name: str, source: str = 'the file'
            ) -> dict[tuple[str, str], np.ndarray]:
  """{(collection, 'layer1_0/conv1/kernel'): array} from a torchvision state_dict.

  Tensors of the model's auxiliary heads (`aux_heads`) are left out. Uses only array methods
  (transpose, reshape), so it also runs under `jax.eval_shape` to check a state_dict's shapes
  against a model without materializing any weights.
  """
  for pattern, renames in KEY_RENAMES.items():
    if re.fullmatch(pattern, model_name):
      for old, new in renames:
        state_dict = {re.sub(old, new, k): v for k, v in state_dict.items()}
  heads = tuple(head + '.' for head in aux_heads(state_dict, model_name))
  state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)} if heads else \
      state_dict
  kinds = module_kinds(state_dict)
  flatten = _flatten_layer(model_name)
  out = {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition('.')
    kind = kinds.get(module, 'unknown')
    if (kind, leaf) not in LEAVES:
      raise CheckpointError(f"{source}: tensor '{key}' of shape {tuple(value.shape)} is not "
                             f"a Conv2d, Linear or BatchNorm parameter cnnjax can map.")
    rule = LEAVES[(kind, leaf)]
    if rule is None:
      continue
    collection, leaf_name, layout = rule
    if layout == 'oihw_to_hwio':
      value = value.transpose(2, 3, 1, 0)
    elif layout == 'flatten':
      value = value.reshape(-1)
    elif layout == 'transpose':
      value = value.T
      if flatten and module_path(module) == flatten[0]:
        value = nchw_rows_to_nhwc(value, flatten[1])
    out[(collection, f'{module_path(module)}/{leaf_name}')] = value
  return out


def read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors or .pth/.pt state_dict file, as float NumPy arrays."""
  suffix = path.suffix.lower()
  if suffix == '.safetensors':
    try:
      from safetensors.numpy import load_file
    except ImportError:
      raise CheckpointError(f'reading {path} needs the safetensors package '
                             f'(pip install safetensors).') from None
    try:
      return dict(load_file(str(path)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{path} is not a readable safetensors file ({e}).') from None
  if suffix in ('.pth', '.pt'):
    try:
      import torch
    except ImportError:
      raise CheckpointError(f'reading {path} needs PyTorch (pip install torch), or convert it to '
                             f'.safetensors (safetensors.torch.save_file) elsewhere.') from None
    try:
      loaded = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{path} is not a PyTorch weights file that loads with '
                             f'weights_only=True ({str(e).splitlines()[0][:200]}).') from None
    return _tensors_of(loaded, path, torch)
  raise CheckpointError(f'{path} is not a weights file cnnjax reads: expected '
                         f'{", ".join(SUFFIXES)} or a cnnjax checkpoint directory.')


def _tensors_of(loaded, path: pathlib.Path, torch) -> dict[str, np.ndarray]:
  """The state_dict inside what torch.load returned (a bare one, or under 'state_dict'/'model')."""
  if isinstance(loaded, dict):
    for wrapper in ('state_dict', 'model_state_dict', 'model'):
      if isinstance(loaded.get(wrapper), dict):
        loaded = loaded[wrapper]
        break
  if not isinstance(loaded, dict) or not loaded or not all(
      isinstance(v, torch.Tensor) for v in loaded.values()):
    raise CheckpointError(f'{path} does not hold a state_dict (a dict of tensor names to tensors).')
  out = {}
  for key, tensor in loaded.items():
    key = key.removeprefix('module.')  # saved from DataParallel
    out[key] = tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else \
        tensor.detach().cpu().numpy()
  return out
