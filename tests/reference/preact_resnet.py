"""Pre-activation ResNet (He et al. 2016, "Identity Mappings"): BN -> ReLU ->
conv units on a clean identity path, a projection shortcut on the
pre-activated input where the shape changes, BN -> ReLU after the last unit;
stochastic depth (Huang et al. 2016) with p_l = p * l / L, the mask drawn at
the unit's start (one Bernoulli(1 - p_l) per sample, survivors / (1 - p_l))."""
import torch
from torch import nn


class Unit(nn.Module):
    def __init__(self, cin, planes, stride, bottleneck, p):
        super().__init__()
        cout = planes * (4 if bottleneck else 1)
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        if bottleneck:
            self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                           if stride != 1 or cin != cout else None)
        self.bottleneck, self.p = bottleneck, p

    def forward(self, x):
        mask = None
        if self.training and self.p > 0:
            keep = 1 - self.p
            mask = torch.empty(x.shape[0], dtype=x.dtype, device=x.device).bernoulli_(keep)
            if keep > 0:
                mask = mask / keep
        a = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(a)
        y = self.conv1(a)
        y = self.conv2(self.relu(self.bn2(y)))
        if self.bottleneck:
            y = self.conv3(self.relu(self.bn3(y)))
        if mask is not None:
            y = y * mask[:, None, None, None]
        return y + shortcut


class PreActResNet(nn.Module):
    def __init__(self, layers, bottleneck, in_channels=3, num_classes=1000, width=64, p=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, l, total = width, 0, sum(layers)
        for i, n in enumerate(layers):
            units = []
            for j in range(n):
                l += 1
                units.append(Unit(cin, width * 2 ** i, 2 if i and not j else 1, bottleneck,
                                  p * l / total))
                cin = width * 2 ** i * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        x = self.avgpool(self.relu(self.norm(x)))
        return self.fc(torch.flatten(x, 1))


DEPTHS = {18: ([2, 2, 2, 2], False), 34: ([3, 4, 6, 3], False), 50: ([3, 4, 6, 3], True),
          101: ([3, 4, 23, 3], True)}


def preact_resnet(depth, **kwargs):
    layers, bottleneck = DEPTHS[depth]
    return PreActResNet(layers, bottleneck, **kwargs)
