"""A convolutional highway network (Srivastava et al. 2015): y = H(x) T(x) +
x (1 - T(x)), H = ReLU(BN(conv x)), T = sigmoid(conv_T x + b_T)."""
from torch import nn


def conv_bn_relu(cin, cout, k, batch_norm):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=not batch_norm)]
    return nn.Sequential(*layers, *([nn.BatchNorm2d(cout)] if batch_norm else []), nn.ReLU())


class Highway(nn.Module):
    def __init__(self, c, k, batch_norm):
        super().__init__()
        self.transform = conv_bn_relu(c, c, k, batch_norm)
        self.gate = nn.Conv2d(c, c, k, padding=k // 2)
        self.gate_act = nn.Sigmoid()

    def forward(self, x):
        h = self.transform(x)  # H before T: module hooks see the model's call order
        t = self.gate_act(self.gate(x))
        return h * t + x * (1 - t)


class HighwayNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=32, depth=10, kernel_size=3,
                 batch_norm=True):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width, kernel_size, batch_norm)
        self.layers = nn.Sequential(*(Highway(width, kernel_size, batch_norm)
                                      for _ in range(depth)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.layers(self.stem(x))).flatten(1))
