"""cnnjax.shapes: the output-size rule, receptive fields, parameters and MACs.

Checked against textbook and paper numbers, torchvision's published parameter and MAC counts,
and PyTorch's own output shapes.
"""
from __future__ import annotations

import itertools

import pytest

from cnnjax import shapes
from cnnjax.shapes import ReceptiveField, conv_output_size, receptive_field, receptive_fields


@pytest.mark.parametrize('args, kwargs, expected', [
    ((227, 11, 4), {}, 55),                     # AlexNet conv1 (Krizhevsky et al.; CS231n)
    ((32, 5), {}, 28),                          # LeNet-5 C1
    ((224, 7, 2, 3), {}, 112),                  # ResNet stem conv
    ((112, 3, 2, 1), {}, 56),                   # ResNet stem max pool
    ((224, 3, 1, 1), {}, 224),                  # VGG's 3x3 'same' convolution
    ((56, 1, 2), {}, 28),                       # 1x1 stride-2 projection shortcut
    ((112, 3, 2), {'ceil_mode': True}, 56),     # GoogLeNet maxpool1 (floor would give 55)
    ((112, 3, 2), {}, 55),
    ((5, 2, 2, 1), {'ceil_mode': True}, 3),     # a window starting in the padding is dropped
    ((10, 3, 1, 0, 2), {}, 6),                  # dilation 2: effective kernel 5
    ((8, 3, 2, (0, 1)), {}, 4),                 # per-side padding, TensorFlow's 'SAME' at s=2
    ((7, 7), {}, 1),                            # kernel as large as the input
])
def test_output_size_textbook_examples(args, kwargs, expected):
  assert conv_output_size(*args, **kwargs) == expected


def test_output_size_two_dimensional():
  assert conv_output_size((224, 224), 7, 2, 3) == (112, 112)
  assert conv_output_size((9, 10), (3, 5), (2, 1), (1, 2)) == (5, 10)
  assert conv_output_size((8, 8), 3, 2, ((0, 1), (1, 0))) == (4, 4)
  assert conv_output_size((7, 8), 4, padding='same') == (7, 8)
  assert conv_output_size((9, 10), 3, padding='same', dilation=2) == (9, 10)
  assert conv_output_size((9, 10), 5, padding='valid') == (5, 6)


@pytest.mark.parametrize('args, kwargs, message', [
    ((4, 5), {}, 'empty'),
    ((5, 3, 1, 0, 3), {}, 'dilated kernel 7'),
    ((3, 3, 1, 0), {'ceil_mode': True}, None),  # fits exactly: 1, not an error
    ((0, 1), {}, 'positive'),
    ((8, 3, 0), {}, 'positive'),
    ((8, 3, 1, -1), {}, 'non-negative'),
    (((8, 8), 3, 2), {'padding': 'same'}, "'same' needs stride 1"),
    ((8, 3, 1, 'same'), {}, 'one axis must be P or'),
    (((5, 32), 7, 2), {'layer': 'Conv2d'}, r'^Conv2d: input \(5, 32\) padded by .* kernel \(7, 7\)'),
])
def test_output_size_bad_input(args, kwargs, message):
  if message is None:
    assert conv_output_size(*args, **kwargs) == 1
    return
  with pytest.raises(ValueError, match=message):
    conv_output_size(*args, **kwargs)


def test_pool_padding_adds_what_ceil_mode_needs_and_checks_pytorchs_rules():
  # GoogLeNet's maxpool1: 112 -> 56 needs one more bottom/right row than floor mode has.
  assert shapes.pool_padding((112, 112), 3, 2, ceil_mode=True) == ((0, 1), (0, 1))
  assert shapes.pool_padding((112, 112), 3, 2) == ((0, 0), (0, 0))
  assert shapes.pool_padding((5, 8), 2, 2, 1, ceil_mode=True) == ((1, 1), (1, 1))  # no 4th window
  with pytest.raises(ValueError, match=r'^AvgPool2d: padding .* at most half the kernel'):
    shapes.pool_padding((8, 8), 2, 2, 2, layer='AvgPool2d')
  with pytest.raises(ValueError, match='empty'):
    shapes.pool_padding((2, 8), 3, 2)


def test_output_size_matches_pytorch_on_a_grid():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  checked = 0
  for size, k, s, d in itertools.product(range(4, 12), (1, 2, 3, 5), (1, 2, 3), (1, 2)):
    x = torch.zeros(1, 1, size, 1)
    for p in range(0, k // 2 + 1):
      try:
        ours = conv_output_size(size, k, s, p, d)
      except ValueError:
        assert size + 2 * p < d * (k - 1) + 1
        continue
      assert F.conv2d(x, torch.zeros(1, 1, k, 1), stride=(s, 1), padding=(p, 0),
                      dilation=(d, 1)).shape[2] == ours
      for ceil in (False, True):
        out = F.max_pool2d(x, (k, 1), (s, 1), (p, 0), dilation=(d, 1), ceil_mode=ceil)
        assert conv_output_size(size, k, s, p, d, ceil_mode=ceil) == out.shape[2]
        checked += 1
  assert checked > 300


def test_receptive_field_textbook_stacks():
  # Simonyan & Zisserman: three stacked 3x3 convs see 7x7, two see 5x5.
  assert receptive_field([(3,)] * 3) == ReceptiveField(7, 1)
  assert receptive_field([(3, 1, 1)] * 2) == ReceptiveField(5, 1)
  assert receptive_field([]) == ReceptiveField(1, 1)
  # Yu & Koltun: 3x3 convs dilated 1, 2, 4 grow the field exponentially: 3, 7, 15.
  assert [f.size for f in receptive_fields([(3, 1, 1), (3, 1, 2), (3, 1, 4)])] == [3, 7, 15]
  # A 2x2 stride-2 pool doubles the jump, so the next 3x3 conv adds 2 * 2 pixels.
  assert receptive_fields([(3,), (2, 2), (3,)]) == [(3, 1), (4, 2), (8, 2)]


def _alexnet_features():
  conv = lambda k, s=1: (k, s)
  pool = (3, 2)
  return [conv(11, 4), pool, conv(5), pool, conv(3), conv(3), conv(3), pool]


def _vgg16_features():
  layers = []
  for n in (2, 2, 3, 3, 3):
    layers += [(3, 1)] * n + [(2, 2)]
  return layers


def test_receptive_field_of_classic_networks():
  # Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural Networks",
  # Distill 2019, table: AlexNet 195 / stride 32, VGG-16 212 / stride 32 (at pool5).
  assert receptive_field(_alexnet_features()) == ReceptiveField(195, 32)
  assert receptive_field(_vgg16_features()) == ReceptiveField(212, 32)


def test_bad_receptive_field_layers():
  with pytest.raises(ValueError, match='kernel'):
    receptive_field([(3, 1, 1, 1)])
  with pytest.raises(ValueError, match='kernel'):
    receptive_field([(0,)])


def test_conv_and_linear_params():
  assert shapes.conv_params(3, 64, 3) == 1_792                      # VGG conv1_1
  assert shapes.conv_params(3, 64, 7, bias=False) == 9_408          # ResNet conv1
  assert shapes.conv_params(32, 32, 3, groups=32, bias=False) == 288  # depthwise
  assert shapes.conv_params(4, 6, (3, 5), groups=2) == 3 * 5 * 2 * 6 + 6
  assert shapes.linear_params(4096, 1000) == 4_097_000
  assert shapes.linear_params(10, 3, bias=False) == 30
  assert shapes.batchnorm_params(64) == 128
  with pytest.raises(ValueError, match='divisible by groups'):
    shapes.conv_params(3, 64, 3, groups=2)


def test_alexnet_params_and_macs_from_the_arithmetic():
  """torchvision's AlexNet, layer by layer: 61,100,840 parameters and 0.714 GMACs (its weights'
  published ``num_params`` and ``_ops``)."""
  size, channels, params, macs = 224, 3, 0, 0
  for out, k, s, p, pool in [(64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
                             (256, 3, 1, 1, False), (256, 3, 1, 1, True)]:
    size = conv_output_size(size, k, s, p)
    params += shapes.conv_params(channels, out, k)
    macs += shapes.conv_macs(channels, out, k, size)
    channels = out
    if pool:
      size = conv_output_size(size, 3, 2)
  assert (size, channels) == (6, 256)
  for fan_in, fan_out in [(6 * 6 * 256, 4096), (4096, 4096), (4096, 1000)]:
    params += shapes.linear_params(fan_in, fan_out)
    macs += shapes.linear_macs(fan_in, fan_out)
  assert params == 61_100_840
  assert round(macs / 1e9, 3) == 0.714


def test_conv_macs():
  assert shapes.conv_macs(3, 64, 7, 112) == 112 * 112 * 64 * 7 * 7 * 3   # 118,013,952
  assert shapes.conv_macs(32, 32, 3, (5, 4), groups=32) == 5 * 4 * 32 * 9
  assert shapes.linear_macs(512, 1000) == 512_000
