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

from . import efficientnet, regnet  # noqa: E402
from .efficientnet import (efficientnet_b0, efficientnet_b1, efficientnet_b2,  # noqa: E402
                           efficientnet_b3, efficientnet_b4, efficientnet_b5, efficientnet_b6,
                           efficientnet_b7, efficientnet_v2_l, efficientnet_v2_m,
                           efficientnet_v2_s)
from .regnet import (regnet_x_1_6gf, regnet_x_3_2gf, regnet_x_8gf, regnet_x_16gf,  # noqa: E402
                     regnet_x_32gf, regnet_x_400mf, regnet_x_800mf, regnet_y_1_6gf,
                     regnet_y_3_2gf, regnet_y_8gf, regnet_y_16gf, regnet_y_32gf, regnet_y_128gf,
                     regnet_y_400mf, regnet_y_800mf)

__all__ += efficientnet.__all__ + regnet.__all__

# The seed architectures torchvision lacks: plain-torch modules, optimized.
from . import anynet, highway, lenet, nin, preact_resnet, simclr  # noqa: E402
from .anynet import anynet, regnetx32  # noqa: E402  (each builder shadows its module)
from .highway import highway_net  # noqa: E402
from .lenet import lenet, lenet_bn  # noqa: E402
from .nin import nin  # noqa: E402
from .preact_resnet import (preact_resnet18, preact_resnet34, preact_resnet50,  # noqa: E402
                            preact_resnet101)
from .simclr import simclr  # noqa: E402

__all__ += ["anynet", "regnetx32", "highway_net", "lenet", "lenet_bn", "nin", "preact_resnet18",
            "preact_resnet34", "preact_resnet50", "preact_resnet101", "simclr"]
