"""torchvision's EfficientNet (B0-B7) and EfficientNetV2 (S, M, L) builders with
fused forwards.

Each builder is torchvision's (same keyword arguments, ``weights=`` enums or
their names, seeded initialisation) followed by ``optimize(inplace=True)``, so
the result is a ``torchvision.models.EfficientNet`` with torchvision's
parameters, state-dict keys and module names, whose Conv2dNormActivation and
MBConv / FusedMBConv blocks run ``fuse.mobile``'s forwards. torchvision is
imported on first use (``models.resnet``'s builder helper).
"""
from __future__ import annotations

from typing import Any

from .resnet import _build

__all__ = ["efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
           "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
           "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"]


def efficientnet_b0(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_b0`` with fused forwards."""
    return _build("efficientnet_b0", weights, progress, kwargs, module="efficientnet")


def efficientnet_b1(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_b1`` with fused forwards."""
    return _build("efficientnet_b1", weights, progress, kwargs, module="efficientnet")


def efficientnet_b2(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_b2`` with fused forwards."""
    return _build("efficientnet_b2", weights, progress, kwargs, module="efficientnet")


def efficientnet_b3(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_b3`` with fused forwards."""
    return _build("efficientnet_b3", weights, progress, kwargs, module="efficientnet")


def efficientnet_b4(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_b4`` with fused forwards."""
    return _build("efficientnet_b4", weights, progress, kwargs, module="efficientnet")


def efficientnet_b5(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_b5`` with fused forwards."""
    return _build("efficientnet_b5", weights, progress, kwargs, module="efficientnet")


def efficientnet_b6(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_b6`` with fused forwards."""
    return _build("efficientnet_b6", weights, progress, kwargs, module="efficientnet")


def efficientnet_b7(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_b7`` with fused forwards."""
    return _build("efficientnet_b7", weights, progress, kwargs, module="efficientnet")


def efficientnet_v2_s(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_v2_s`` with fused forwards."""
    return _build("efficientnet_v2_s", weights, progress, kwargs, module="efficientnet")


def efficientnet_v2_m(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_v2_m`` with fused forwards."""
    return _build("efficientnet_v2_m", weights, progress, kwargs, module="efficientnet")


def efficientnet_v2_l(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``efficientnet_v2_l`` with fused forwards."""
    return _build("efficientnet_v2_l", weights, progress, kwargs, module="efficientnet")
