"""LeNet-5 (LeCun et al. 1998, "Gradient-based learning applied to document
recognition") as the seeds write it (d2l's ``LeNet``): two 5x5 conv blocks
(6 -> 16 channels, padding 2 on the first, sigmoid, 2x2 average pooling), then
dense 120 -> 84 -> classes; and ``lenet_bn``, the same with BatchNorm after
every conv and dense layer but the last (Ioffe & Szegedy 2015, d2l's BN-LeNet).

Both are one ``nn.Sequential`` named ``net``, as the seeds have it. In
``lenet_bn`` the conv -> BatchNorm2d -> sigmoid runs are fused by the
Sequential family (``conv_bn_act``); each dense layer with its BatchNorm1d and
sigmoid is a ``LinearBNAct``, whose BatchNorm1d -> act runs as ``bn_act`` on the
[N, C, 1, 1] view (``fuse.dense1d``). ``lenet`` has no BatchNorm: its two
conv -> sigmoid runs are each one ``conv_act`` (the Sequential family); its
dense layers run as plain torch (no op computes linear -> sigmoid).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..fuse import optimize

__all__ = ["LeNet", "LinearBNAct", "lenet", "lenet_bn"]


class LinearBNAct(nn.Module):
    """``act(bn(linear(x)))`` with a BatchNorm1d: the BN chapter's dense layer,
    h = phi(BN(Wx + b))."""

    def __init__(self, in_features: int, out_features: int, act: nn.Module):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.bn = nn.BatchNorm1d(out_features)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.linear(x)))


class LeNet(nn.Module):
    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _init_cnn(module: nn.Module) -> None:
    """The seeds' ``init_cnn``: Xavier-uniform weights for every Linear and Conv2d."""
    if type(module) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)


def lenet(in_channels: int = 1, num_classes: int = 10) -> LeNet:
    """LeNet-5 for 28x28 inputs (61,706 parameters at the defaults)."""
    model = LeNet(nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, num_classes)))
    model.apply(_init_cnn)
    return optimize(model, inplace=True)


def lenet_bn(in_channels: int = 1, num_classes: int = 10) -> LeNet:
    """LeNet-5 with BatchNorm after each conv and dense layer but the output one."""
    model = LeNet(nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.BatchNorm2d(6), nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        LinearBNAct(16 * 5 * 5, 120, nn.Sigmoid()),
        LinearBNAct(120, 84, nn.Sigmoid()),
        nn.Linear(84, num_classes)))
    model.apply(_init_cnn)
    return optimize(model, inplace=True)
