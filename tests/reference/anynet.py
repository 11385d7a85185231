"""AnyNet as d2l builds it from ResNeXt blocks (Radosavovic et al. 2020)."""
from torch import nn


class ResNeXtBlock(nn.Module):
    def __init__(self, cin, num_channels, group_width, bot_mul, use_1x1conv=False, strides=1):
        super().__init__()
        bot = int(round(num_channels * bot_mul))
        self.conv1 = nn.Conv2d(cin, bot, kernel_size=1, stride=1)
        self.conv2 = nn.Conv2d(bot, bot, kernel_size=3, stride=strides, padding=1,
                               groups=bot // group_width)
        self.conv3 = nn.Conv2d(bot, num_channels, kernel_size=1, stride=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(bot), nn.BatchNorm2d(bot)
        self.bn3 = nn.BatchNorm2d(num_channels)
        self.relu = nn.ReLU()
        if use_1x1conv:
            self.conv4 = nn.Conv2d(cin, num_channels, kernel_size=1, stride=strides)
            self.bn4 = nn.BatchNorm2d(num_channels)
        else:
            self.conv4 = None

    def forward(self, X):
        # self.relu where d2l writes F.relu: the same function, and module
        # hooks see the same calls as in the model under test.
        Y = self.relu(self.bn1(self.conv1(X)))
        Y = self.relu(self.bn2(self.conv2(Y)))
        Y = self.bn3(self.conv3(Y))
        if self.conv4:
            X = self.bn4(self.conv4(X))
        return self.relu(Y + X)


class AnyNet(nn.Module):
    def __init__(self, arch, stem_channels, num_classes=10, in_channels=3):
        super().__init__()
        self.net = nn.Sequential()
        self.net.add_module("stem", nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(stem_channels), nn.ReLU()))
        cin = stem_channels
        for i, (depth, c, g, k) in enumerate(arch):
            blk = []
            for j in range(depth):
                blk.append(ResNeXtBlock(cin, c, g, k, use_1x1conv=True, strides=2) if j == 0
                           else ResNeXtBlock(c, c, g, k))
                cin = c
            self.net.add_module(f"stage{i + 1}", nn.Sequential(*blk))
        self.net.add_module("head", nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(cin, num_classes)))

    def forward(self, x):
        return self.net(x)
