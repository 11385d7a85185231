"""The architecture set on the fused ops (torchvision-compatible builders)."""
from .densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from .resnet import (resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d,
                     resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]

from .googlenet import googlenet, inception_v3  # noqa: E402  (after the names above: a module shares its name)
from .vgg import (alexnet, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn,  # noqa: E402
                  vgg19, vgg19_bn)

__all__ += ["googlenet", "inception_v3", "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn",
            "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
