"""Highway networks (Srivastava, Greff & Schmidhuber 2015, "Training Very Deep
Networks"), in a convolutional form for images.

Each highway layer computes y = H(x) * T(x) + x * (1 - T(x)): the transform
H(x) = ReLU(BN(conv(x))) and the transform gate T(x) = sigmoid(conv_T(x) + b_T),
whose bias b_T starts negative (``gate_bias``, default -2) so that the network
starts by carrying its input (the carry gate C = 1 - T). Every layer keeps the
shape (k x k convs, 'same' padding), so ``depth`` sets the depth alone. A
conv -> BN -> ReLU stem maps the input to ``width`` channels; the head is
global average pooling and a linear classifier.

Fused: H and the stem run as one ``conv_bn_act`` each (the Sequential family;
``batch_norm=False`` gives the paper's plain conv -> ReLU transform, which runs
as one ``conv_act``). In each layer the gate's sigmoid and the combination
H T + x (1 - T) run as one ``highway_gate`` on the gate conv's output, which
runs as the conv module (``fuse/highway.py``; ``HighwayLayer.forward`` below is
the layer's own computation, which hooks on ``gate_act``, FX and export get).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..fuse import optimize

__all__ = ["HighwayLayer", "HighwayNet", "highway_net"]


def _conv_bn_relu(cin: int, cout: int, k: int, batch_norm: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers, nn.ReLU())


class HighwayLayer(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 3, gate_bias: float = -2.0,
                 batch_norm: bool = True):
        super().__init__()
        self.transform = _conv_bn_relu(channels, channels, kernel_size, batch_norm)
        self.gate = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.gate_act = nn.Sigmoid()
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.transform(x)
        t = self.gate_act(self.gate(x))
        return h * t + x * (1 - t)


class HighwayNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 depth: int = 10, kernel_size: int = 3, gate_bias: float = -2.0,
                 batch_norm: bool = True):
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, width, kernel_size, batch_norm)
        self.layers = nn.Sequential(*(HighwayLayer(width, kernel_size, gate_bias, batch_norm)
                                      for _ in range(depth)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(self.avgpool(x).flatten(1))


def highway_net(in_channels: int = 1, num_classes: int = 10, *, width: int = 32,
                depth: int = 10, kernel_size: int = 3, gate_bias: float = -2.0,
                batch_norm: bool = True) -> HighwayNet:
    """A convolutional highway network of ``depth`` highway layers."""
    return optimize(HighwayNet(in_channels, num_classes, width, depth, kernel_size, gate_bias,
                               batch_norm), inplace=True)
