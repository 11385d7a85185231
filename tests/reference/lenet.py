"""LeNet-5 and BN-LeNet as the seeds' d2l code writes them (one Sequential
``net``); BN-LeNet's dense layers as named (linear, bn, act) Sequentials."""
from collections import OrderedDict

from torch import nn


class LeNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, batch_norm=False):
        super().__init__()
        bn2d = (lambda c: [nn.BatchNorm2d(c)]) if batch_norm else (lambda c: [])

        def dense(cin, cout):
            if not batch_norm:
                return [nn.Linear(cin, cout), nn.Sigmoid()]
            return [nn.Sequential(OrderedDict(linear=nn.Linear(cin, cout),
                                              bn=nn.BatchNorm1d(cout), act=nn.Sigmoid()))]

        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), *bn2d(6), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), *bn2d(16), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(), *dense(400, 120), *dense(120, 84), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.net(x)
