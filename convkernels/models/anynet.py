"""The AnyNet design space (Radosavovic et al. 2020, "Designing Network Design
Spaces") as the seeds and d2l build it, and d2l's ``RegNetX32`` from it.

stem: 3x3/2 conv -> BN -> ReLU to ``stem_channels``; body: stage i is
``depths[i]`` ResNeXt blocks of ``widths[i]`` output channels, group width
``group_widths[i]`` and bottleneck ratio ``bottleneck_ratios[i]``, the first
block halving the resolution (3x3 conv stride 2, 1x1 conv + BN projection
shortcut); head: global average pooling and a linear classifier.

Fused: the stem as one ``conv_bn_act`` (the Sequential family); in each block
(``fuse.anynet``) conv1 -> bn1 -> ReLU and conv2 -> bn2 -> ReLU as one each, the
projection conv4 -> bn4 as one (act identity), and conv3 -> bn3, the shortcut
add and the ReLU as one with the shortcut as residual.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..fuse import optimize

__all__ = ["AnyNet", "ResNeXtBlock", "anynet", "regnetx32"]


class ResNeXtBlock(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + shortcut(x)),
    conv2 grouped into bottleneck / group_width groups."""

    def __init__(self, in_channels: int, channels: int, group_width: int,
                 bottleneck_ratio: float, stride: int = 1, projection: bool = False):
        super().__init__()
        bot = int(round(channels * bottleneck_ratio))
        self.conv1 = nn.Conv2d(in_channels, bot, 1)
        self.bn1 = nn.BatchNorm2d(bot)
        self.conv2 = nn.Conv2d(bot, bot, 3, stride, 1, groups=bot // group_width)
        self.bn2 = nn.BatchNorm2d(bot)
        self.conv3 = nn.Conv2d(bot, channels, 1)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        if projection:
            self.conv4 = nn.Conv2d(in_channels, channels, 1, stride)
            self.bn4 = nn.BatchNorm2d(channels)
        else:
            self.conv4 = self.bn4 = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.conv4 is not None:
            x = self.bn4(self.conv4(x))
        return self.relu(y + x)


class AnyNet(nn.Module):
    def __init__(self, stem_channels: int, depths: Sequence[int], widths: Sequence[int],
                 group_widths: Sequence[int], bottleneck_ratios: Sequence[float],
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if not len(depths) == len(widths) == len(group_widths) == len(bottleneck_ratios):
            raise ValueError("anynet: depths, widths, group_widths and bottleneck_ratios "
                             "need one entry per stage")
        self.net = nn.Sequential()
        self.net.add_module("stem", nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, 2, 1), nn.BatchNorm2d(stem_channels),
            nn.ReLU()))
        cin = stem_channels
        for i, (d, c, g, k) in enumerate(zip(depths, widths, group_widths, bottleneck_ratios)):
            blocks = [ResNeXtBlock(cin if j == 0 else c, c, g, k, 2 if j == 0 else 1, j == 0)
                      for j in range(d)]
            self.net.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
            cin = c
        self.net.add_module("head", nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)))
        for m in self.modules():
            if type(m) in (nn.Conv2d, nn.Linear):  # the seeds' init_cnn
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def anynet(stem_channels: int, depths: Sequence[int], widths: Sequence[int],
           group_widths: Sequence[int], bottleneck_ratios: Sequence[float],
           num_classes: int = 10, *, in_channels: int = 3) -> AnyNet:
    """An AnyNet: one entry per stage in each sequence."""
    return optimize(AnyNet(stem_channels, depths, widths, group_widths, bottleneck_ratios,
                           num_classes, in_channels), inplace=True)


def regnetx32(in_channels: int = 1, num_classes: int = 10) -> AnyNet:
    """d2l's RegNetX-32: stem 32, depths (4, 6), widths (32, 80), group width 16,
    bottleneck ratio 1 (d2l trains it on 1-channel FashionMNIST)."""
    return anynet(32, (4, 6), (32, 80), (16, 16), (1, 1), num_classes, in_channels=in_channels)
