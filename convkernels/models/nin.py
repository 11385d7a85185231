"""Network in Network (Lin et al. 2013, "Network In Network") as the seeds
write it (d2l's ``NiN``): NiN blocks (a k x k conv and two 1x1 convs, each with
ReLU), 3x3/2 max pooling between them, dropout, a last block with one channel
per class and global average pooling as the head (no dense layer).

The defaults are the seeds' (96, 256, 384 channels; an 11x11/4 first conv, for
224x224 inputs). ``widths`` and ``first_conv`` (kernel, stride, padding) make
small models for small images. With ``batch_norm=True`` each conv gets a
BatchNorm2d before its ReLU, and each conv -> BN -> ReLU runs as one
``conv_bn_act`` (the Sequential family); without BatchNorm, as in the seeds,
each conv -> ReLU runs as one ``conv_act``.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..fuse import optimize

__all__ = ["NiN", "nin", "nin_block"]


def nin_block(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
              batch_norm: bool = False) -> nn.Sequential:
    layers = []
    for i, (k, s, p) in enumerate([(kernel_size, stride, padding), (1, 1, 0), (1, 1, 0)]):
        layers.append(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, k, s, p))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NiN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: tuple = (96, 256, 384), first_conv: tuple = (11, 4, 0),
                 batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        c1, c2, c3 = widths
        self.net = nn.Sequential(
            nin_block(in_channels, c1, *first_conv, batch_norm), nn.MaxPool2d(3, 2),
            nin_block(c1, c2, 5, 1, 2, batch_norm), nn.MaxPool2d(3, 2),
            nin_block(c2, c3, 3, 1, 1, batch_norm), nn.MaxPool2d(3, 2),
            nn.Dropout(dropout),
            nin_block(c3, num_classes, 3, 1, 1, batch_norm),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in self.modules():
            if type(m) is nn.Conv2d:  # the seeds' init_cnn
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def nin(in_channels: int = 1, num_classes: int = 10, *, widths: tuple = (96, 256, 384),
        first_conv: tuple = (11, 4, 0), batch_norm: bool = False, dropout: float = 0.5) -> NiN:
    """NiN; ``first_conv`` is the first block's (kernel, stride, padding)."""
    return optimize(NiN(in_channels, num_classes, widths, first_conv, batch_norm, dropout),
                    inplace=True)
