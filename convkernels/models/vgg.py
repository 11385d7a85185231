"""torchvision's AlexNet and VGG builders with fused forwards.

Each builder is torchvision's followed by ``optimize(inplace=True)`` (see
``models.resnet``). ``features`` is an ``nn.Sequential``: in the ``_bn``
variants the sequential family runs each Conv2d -> BatchNorm2d -> ReLU as one
``conv_bn_act``; without BN (alexnet, vgg11..vgg19) each Conv2d -> ReLU runs
as one ``conv_act`` (conv + bias + ReLU). The classifiers (Linear, ReLU,
Dropout) stay torchvision's.
"""
from __future__ import annotations

from typing import Any

from .resnet import _build

__all__ = ["alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


def alexnet(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``alexnet`` with fused forwards (its five conv -> ReLU as ``conv_act``)."""
    return _build("alexnet", weights, progress, kwargs, module="alexnet")


def vgg11(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``vgg11`` with fused forwards."""
    return _build("vgg11", weights, progress, kwargs, module="vgg")


def vgg11_bn(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``vgg11_bn`` with fused forwards."""
    return _build("vgg11_bn", weights, progress, kwargs, module="vgg")


def vgg13(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``vgg13`` with fused forwards."""
    return _build("vgg13", weights, progress, kwargs, module="vgg")


def vgg13_bn(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``vgg13_bn`` with fused forwards."""
    return _build("vgg13_bn", weights, progress, kwargs, module="vgg")


def vgg16(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``vgg16`` with fused forwards."""
    return _build("vgg16", weights, progress, kwargs, module="vgg")


def vgg16_bn(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``vgg16_bn`` with fused forwards."""
    return _build("vgg16_bn", weights, progress, kwargs, module="vgg")


def vgg19(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``vgg19`` with fused forwards."""
    return _build("vgg19", weights, progress, kwargs, module="vgg")


def vgg19_bn(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``vgg19_bn`` with fused forwards."""
    return _build("vgg19_bn", weights, progress, kwargs, module="vgg")
