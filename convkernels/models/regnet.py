"""torchvision's RegNetX and RegNetY builders with fused forwards.

Each builder is torchvision's (same keyword arguments, ``weights=`` enums or
their names, seeded initialisation) followed by ``optimize(inplace=True)``, so
the result is a ``torchvision.models.RegNet`` with torchvision's parameters,
state-dict keys and module names, whose stem, Conv2dNormActivation layers and
ResBottleneckBlocks run ``fuse.mobile``'s forwards. torchvision is imported on first
use (``models.resnet``'s builder helper).
"""
from __future__ import annotations

from typing import Any

from .resnet import _build

__all__ = ["regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf",
           "regnet_y_8gf", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf", "regnet_x_400mf",
           "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
           "regnet_x_16gf", "regnet_x_32gf"]


def regnet_y_400mf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_y_400mf`` with fused forwards."""
    return _build("regnet_y_400mf", weights, progress, kwargs, module="regnet")


def regnet_y_800mf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_y_800mf`` with fused forwards."""
    return _build("regnet_y_800mf", weights, progress, kwargs, module="regnet")


def regnet_y_1_6gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_y_1_6gf`` with fused forwards."""
    return _build("regnet_y_1_6gf", weights, progress, kwargs, module="regnet")


def regnet_y_3_2gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_y_3_2gf`` with fused forwards."""
    return _build("regnet_y_3_2gf", weights, progress, kwargs, module="regnet")


def regnet_y_8gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_y_8gf`` with fused forwards."""
    return _build("regnet_y_8gf", weights, progress, kwargs, module="regnet")


def regnet_y_16gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_y_16gf`` with fused forwards."""
    return _build("regnet_y_16gf", weights, progress, kwargs, module="regnet")


def regnet_y_32gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_y_32gf`` with fused forwards."""
    return _build("regnet_y_32gf", weights, progress, kwargs, module="regnet")


def regnet_y_128gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_y_128gf`` with fused forwards."""
    return _build("regnet_y_128gf", weights, progress, kwargs, module="regnet")


def regnet_x_400mf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_x_400mf`` with fused forwards."""
    return _build("regnet_x_400mf", weights, progress, kwargs, module="regnet")


def regnet_x_800mf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_x_800mf`` with fused forwards."""
    return _build("regnet_x_800mf", weights, progress, kwargs, module="regnet")


def regnet_x_1_6gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_x_1_6gf`` with fused forwards."""
    return _build("regnet_x_1_6gf", weights, progress, kwargs, module="regnet")


def regnet_x_3_2gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_x_3_2gf`` with fused forwards."""
    return _build("regnet_x_3_2gf", weights, progress, kwargs, module="regnet")


def regnet_x_8gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_x_8gf`` with fused forwards."""
    return _build("regnet_x_8gf", weights, progress, kwargs, module="regnet")


def regnet_x_16gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_x_16gf`` with fused forwards."""
    return _build("regnet_x_16gf", weights, progress, kwargs, module="regnet")


def regnet_x_32gf(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``regnet_x_32gf`` with fused forwards."""
    return _build("regnet_x_32gf", weights, progress, kwargs, module="regnet")
