"""Pre-activation ResNet (ResNetV2; He et al. 2016, "Identity Mappings in Deep
Residual Networks").

Each residual unit is BN -> ReLU -> conv, twice (basic) or three times
(bottleneck), added to a clean identity path: nothing after the addition. A
projection shortcut (1x1 conv, stride s, when the shape changes) takes the
pre-activated input, as the paper's units do. The stem is conv 7x7/2 and max
pooling without BN (the first unit pre-activates it); one BN -> ReLU follows
the last unit, before global average pooling and the classifier.

Stochastic depth (Huang et al. 2016): unit l of L drops its residual branch
per sample with probability p_l = p * l / L in training, survivors scaled by
1 / (1 - p_l); eval is the identity. The mask is ``fuse.resnet.drop_scale``'s,
drawn at the unit's start, so the fused and the modules' own forwards draw the
same one.

``fuse.preact`` runs each BN -> ReLU -> conv as one ``bn_act_conv`` (BN -> ReLU
as ``bn_act`` where the projection shortcut shares it), the final BN -> ReLU as
``bn_act`` and the stochastic-depth join as ``add_act``. ``width`` (default 64)
scales every stage, for small models.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..fuse import optimize
from ..fuse.resnet import drop_scale

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreActResNet", "preact_resnet18",
           "preact_resnet34", "preact_resnet50", "preact_resnet101"]


def _join(branch: Tensor, shortcut: Tensor, scale: Optional[Tensor]) -> Tensor:
    if scale is not None:
        branch = branch * scale.view(-1, 1, 1, 1).to(branch.dtype)
    return branch + shortcut


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 stochastic_depth_prob: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = _projection(inplanes, planes * self.expansion, stride)
        self.stochastic_depth_prob = stochastic_depth_prob

    def forward(self, x: Tensor) -> Tensor:
        scale = drop_scale(self, x)
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return _join(out, shortcut, scale)


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 stochastic_depth_prob: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.downsample = _projection(inplanes, planes * self.expansion, stride)
        self.stochastic_depth_prob = stochastic_depth_prob

    def forward(self, x: Tensor) -> Tensor:
        scale = drop_scale(self, x)
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return _join(out, shortcut, scale)


def _projection(inplanes: int, outplanes: int, stride: int) -> Optional[nn.Conv2d]:
    """The paper's projection shortcut where the shape changes; else identity."""
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Conv2d(inplanes, outplanes, 1, stride, bias=False)


class PreActResNet(nn.Module):
    def __init__(self, block: type, layers: list, in_channels: int = 3, num_classes: int = 1000,
                 width: int = 64, stochastic_depth_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= stochastic_depth_prob <= 1.0:
            raise ValueError(f"stochastic_depth_prob must be in [0, 1], got {stochastic_depth_prob}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        total, done, inplanes = sum(layers), 0, width
        for i, n in enumerate(layers):
            planes, blocks = width * 2 ** i, []
            for j in range(n):
                done += 1
                blocks.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1,
                                    stochastic_depth_prob * done / total))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.norm = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.norm(x))
        return self.fc(self.avgpool(x).flatten(1))


def _build(block: type, layers: list, in_channels: int, num_classes: int, width: int,
           stochastic_depth_prob: float) -> PreActResNet:
    return optimize(PreActResNet(block, layers, in_channels, num_classes, width,
                                 stochastic_depth_prob), inplace=True)


def preact_resnet18(in_channels: int = 3, num_classes: int = 1000,
                    stochastic_depth_prob: float = 0.0, *, width: int = 64) -> PreActResNet:
    """Pre-activation ResNet-18: basic units, (2, 2, 2, 2)."""
    return _build(PreActBasicBlock, [2, 2, 2, 2], in_channels, num_classes, width,
                  stochastic_depth_prob)


def preact_resnet34(in_channels: int = 3, num_classes: int = 1000,
                    stochastic_depth_prob: float = 0.0, *, width: int = 64) -> PreActResNet:
    """Pre-activation ResNet-34: basic units, (3, 4, 6, 3)."""
    return _build(PreActBasicBlock, [3, 4, 6, 3], in_channels, num_classes, width,
                  stochastic_depth_prob)


def preact_resnet50(in_channels: int = 3, num_classes: int = 1000,
                    stochastic_depth_prob: float = 0.0, *, width: int = 64) -> PreActResNet:
    """Pre-activation ResNet-50: bottleneck units, (3, 4, 6, 3)."""
    return _build(PreActBottleneck, [3, 4, 6, 3], in_channels, num_classes, width,
                  stochastic_depth_prob)


def preact_resnet101(in_channels: int = 3, num_classes: int = 1000,
                     stochastic_depth_prob: float = 0.0, *, width: int = 64) -> PreActResNet:
    """Pre-activation ResNet-101: bottleneck units, (3, 4, 23, 3)."""
    return _build(PreActBottleneck, [3, 4, 23, 3], in_channels, num_classes, width,
                  stochastic_depth_prob)
