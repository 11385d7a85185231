"""torchvision's GoogLeNet and Inception v3 builders with fused forwards.

Each builder is torchvision's followed by ``optimize(inplace=True)`` (see
``models.resnet``): every BasicConv2d runs as one ``conv_bn_act`` and each
Inception block writes its branches into one output (``fuse.inception``); the
aux classifiers and ``transform_input`` are torchvision's.
"""
from __future__ import annotations

from typing import Any

from .resnet import _build

__all__ = ["googlenet", "inception_v3"]


def googlenet(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``googlenet`` with fused forwards."""
    return _build("googlenet", weights, progress, kwargs, module="googlenet")


def inception_v3(*, weights=None, progress: bool = True, **kwargs: Any):
    """torchvision's ``inception_v3`` with fused forwards."""
    return _build("inception_v3", weights, progress, kwargs, module="inception")
