"""torchvision's ResNet, ResNeXt and Wide ResNet builders with fused forwards.

Each builder is torchvision's (same keyword arguments, ``weights=`` enums or
their names, seeded initialisation) followed by ``optimize(inplace=True)``, so
the result is a ``torchvision.models.ResNet`` with torchvision's parameters,
state-dict keys and module names. torchvision is imported on first use.
"""
from __future__ import annotations

from typing import Any

from ..fuse import optimize

__all__ = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


def _build(name: str, weights, progress: bool, kwargs: dict):
    from torchvision.models import resnet as tv_resnet

    builder = getattr(tv_resnet, name)
    return optimize(builder(weights=weights, progress=progress, **kwargs), inplace=True)


def resnet18(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``resnet18`` with fused forwards."""
    return _build("resnet18", weights, progress, kwargs)


def resnet34(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``resnet34`` with fused forwards."""
    return _build("resnet34", weights, progress, kwargs)


def resnet50(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``resnet50`` with fused forwards."""
    return _build("resnet50", weights, progress, kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``resnet101`` with fused forwards."""
    return _build("resnet101", weights, progress, kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``resnet152`` with fused forwards."""
    return _build("resnet152", weights, progress, kwargs)


def resnext50_32x4d(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``resnext50_32x4d`` with fused forwards."""
    return _build("resnext50_32x4d", weights, progress, kwargs)


def resnext101_32x8d(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``resnext101_32x8d`` with fused forwards."""
    return _build("resnext101_32x8d", weights, progress, kwargs)


def resnext101_64x4d(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``resnext101_64x4d`` with fused forwards."""
    return _build("resnext101_64x4d", weights, progress, kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``wide_resnet50_2`` with fused forwards."""
    return _build("wide_resnet50_2", weights, progress, kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``wide_resnet101_2`` with fused forwards."""
    return _build("wide_resnet101_2", weights, progress, kwargs)
