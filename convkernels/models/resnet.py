"""torchvision's ResNet, ResNeXt and Wide ResNet builders with fused forwards.

Each builder is torchvision's (same keyword arguments, ``weights=`` enums or
their names, seeded initialisation) followed by ``optimize(inplace=True)``, so
the result is a ``torchvision.models.ResNet`` with torchvision's parameters,
state-dict keys and module names. torchvision is imported on first use.

``stochastic_depth_prob=p`` (default 0: torchvision's model exactly) gives the
blocks stochastic depth (Huang et al. 2016): see ``fuse.resnet``.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..fuse import optimize

__all__ = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


def _build(name: str, weights, progress: bool, kwargs: dict, module: str = "resnet",
           **optimize_kwargs):
    """torchvision.models.<module>.<name>(weights=, progress=, **kwargs), optimized
    in place with ``optimize_kwargs`` (the other builder modules use it too)."""
    builder = getattr(importlib.import_module(f"torchvision.models.{module}"), name)
    return optimize(builder(weights=weights, progress=progress, **kwargs), inplace=True,
                    **optimize_kwargs)


def resnet18(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
             **kwargs: Any):
    """torchvision's ``resnet18`` with fused forwards."""
    return _build("resnet18", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def resnet34(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
             **kwargs: Any):
    """torchvision's ``resnet34`` with fused forwards."""
    return _build("resnet34", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def resnet50(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
             **kwargs: Any):
    """torchvision's ``resnet50`` with fused forwards."""
    return _build("resnet50", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def resnet101(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
              **kwargs: Any):
    """torchvision's ``resnet101`` with fused forwards."""
    return _build("resnet101", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def resnet152(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
              **kwargs: Any):
    """torchvision's ``resnet152`` with fused forwards."""
    return _build("resnet152", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def resnext50_32x4d(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
                    **kwargs: Any):
    """torchvision's ``resnext50_32x4d`` with fused forwards."""
    return _build("resnext50_32x4d", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def resnext101_32x8d(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
                     **kwargs: Any):
    """torchvision's ``resnext101_32x8d`` with fused forwards."""
    return _build("resnext101_32x8d", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def resnext101_64x4d(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
                     **kwargs: Any):
    """torchvision's ``resnext101_64x4d`` with fused forwards."""
    return _build("resnext101_64x4d", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def wide_resnet50_2(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
                    **kwargs: Any):
    """torchvision's ``wide_resnet50_2`` with fused forwards."""
    return _build("wide_resnet50_2", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)


def wide_resnet101_2(*, weights=None, progress: bool = True, stochastic_depth_prob: float = 0.0,
                     **kwargs: Any):
    """torchvision's ``wide_resnet101_2`` with fused forwards."""
    return _build("wide_resnet101_2", weights, progress, kwargs,
                  stochastic_depth_prob=stochastic_depth_prob)
