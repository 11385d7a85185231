"""NiN as the seeds' d2l code writes it, with the block sizes as arguments and
an optional BatchNorm after each conv."""
from torch import nn


def nin_block(cin, cout, kernel_size, strides, padding, batch_norm):
    layers = []
    for cin_, k, s, p in ((cin, kernel_size, strides, padding), (cout, 1, 1, 0), (cout, 1, 1, 0)):
        layers += [nn.Conv2d(cin_, cout, k, s, p)] + ([nn.BatchNorm2d(cout)] if batch_norm else [])
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NiN(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, widths=(96, 256, 384),
                 first_conv=(11, 4, 0), batch_norm=False):
        super().__init__()
        c1, c2, c3 = widths
        self.net = nn.Sequential(
            nin_block(in_channels, c1, *first_conv, batch_norm), nn.MaxPool2d(3, stride=2),
            nin_block(c1, c2, 5, 1, 2, batch_norm), nn.MaxPool2d(3, stride=2),
            nin_block(c2, c3, 3, 1, 1, batch_norm), nn.MaxPool2d(3, stride=2),
            nn.Dropout(0.5),
            nin_block(c3, num_classes, 3, 1, 1, batch_norm),
            nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())

    def forward(self, x):
        return self.net(x)
