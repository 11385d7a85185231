"""torchvision's DenseNet builders with fused forwards.

Each builder is torchvision's (same keyword arguments, ``weights=`` enums or
their names, the legacy ``pretrained=``, seeded initialisation) followed by
``optimize(inplace=True)``: the result is a ``torchvision.models.DenseNet``
with torchvision's parameters, state-dict keys and module names, whose dense
blocks, transitions, stem and head run the fused family of ``fuse.densenet``
(shared-buffer blocks: see ``_dense_block``). torchvision is imported on first
use.
"""
from __future__ import annotations

from typing import Any

from ..fuse import optimize

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201"]


def DenseNet(**kwargs: Any):
    """``torchvision.models.DenseNet(**kwargs)`` with fused forwards (a builder:
    the model's class is torchvision's)."""
    from torchvision.models import densenet as tv_densenet

    return optimize(tv_densenet.DenseNet(**kwargs), inplace=True)


def _build(name: str, weights, progress: bool, kwargs: dict):
    from torchvision.models import densenet as tv_densenet

    model = getattr(tv_densenet, name)(weights=weights, progress=progress, **kwargs)
    return optimize(model, inplace=True)


def densenet121(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``densenet121`` with fused forwards."""
    return _build("densenet121", weights, progress, kwargs)


def densenet161(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``densenet161`` with fused forwards."""
    return _build("densenet161", weights, progress, kwargs)


def densenet169(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``densenet169`` with fused forwards."""
    return _build("densenet169", weights, progress, kwargs)


def densenet201(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``densenet201`` with fused forwards."""
    return _build("densenet201", weights, progress, kwargs)
