"""torchvision's ResNet family (ResNet, ResNeXt, Wide ResNet): BasicBlock,
Bottleneck and the stem.

Each block's forward is torchvision's with its parts fused: conv -> BN -> ReLU
as one ``conv_bn_act``, and the last conv's BN, the shortcut add and the final
ReLU as one more with the shortcut as the epilogue's residual. The downsample
``Sequential(conv1x1, BN)`` is not the block's business: it is called as a
module, and the Sequential family fuses it (act ``identity``), so a hook on it
or inside it affects only it. The stem (conv1, bn1, relu) lives directly on the
``ResNet``, so fusing it means binding the top-level forward; everything else
there is called as torchvision calls it.

Nothing here imports torchvision: the classes are registered by path.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._guard import part_blocker
from ._parts import conv_bn_act
from ._registry import Family, Pattern, register


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    return x if block.downsample is None else block.downsample(x)


def _join(block: nn.Module, x: Tensor, out: Tensor, conv: nn.Module, bn: nn.Module) -> Tensor:
    """``relu(bn(conv(out)) + shortcut(x))``. The fused op needs the shortcut
    first, torchvision computes it after ``bn``; that order is unobservable
    unless conv, bn or relu have hooks (or global hooks exist), and then
    torchvision's order is kept so that hooks fire in the same order."""
    if part_blocker(conv, bn, block.relu) is None:
        return conv_bn_act(out, conv, bn, block.relu, _shortcut(block, x))
    out = bn(conv(out))
    out += _shortcut(block, x)
    return block.relu(out)


def basic_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    out = conv_bn_act(x, block.conv1, block.bn1, block.relu)
    return _join(block, x, out, block.conv2, block.bn2)


def bottleneck_forward(block: nn.Module, x: Tensor) -> Tensor:
    out = conv_bn_act(x, block.conv1, block.bn1, block.relu)
    out = conv_bn_act(out, block.conv2, block.bn2, block.relu)
    return _join(block, x, out, block.conv3, block.bn3)


def resnet_forward(model: nn.Module, x: Tensor) -> Tensor:
    x = conv_bn_act(x, model.conv1, model.bn1, model.relu)
    x = model.maxpool(x)
    x = model.layer1(x)
    x = model.layer2(x)
    x = model.layer3(x)
    x = model.layer4(x)
    x = model.avgpool(x)
    x = torch.flatten(x, 1)
    return model.fc(x)


def _named(module: nn.Module, *names: str) -> list:
    return [(n, getattr(module, n)) for n in names]


def _basic_patterns(block: nn.Module) -> list:
    return [Pattern(*_named(block, "conv1", "bn1", "relu")),
            Pattern(*_named(block, "conv2", "bn2", "relu"), residual=True)]


def _bottleneck_patterns(block: nn.Module) -> list:
    return [Pattern(*_named(block, "conv1", "bn1", "relu")),
            Pattern(*_named(block, "conv2", "bn2", "relu")),
            Pattern(*_named(block, "conv3", "bn3", "relu"), residual=True)]


def _stem_patterns(model: nn.Module) -> list:
    return [Pattern(*_named(model, "conv1", "bn1", "relu"))]


_TV = "torchvision.models.resnet."
register(_TV + "BasicBlock", Family("resnet.BasicBlock", basic_block_forward, _basic_patterns))
register(_TV + "Bottleneck", Family("resnet.Bottleneck", bottleneck_forward, _bottleneck_patterns))
register(_TV + "ResNet", Family("resnet.stem", resnet_forward, _stem_patterns))
