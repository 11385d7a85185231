"""``optimize(model)``: fused forwards for an existing model, without swapping
modules.

Each module whose exact class a family knows (``sequential``, ``resnet``) gets
that family's forward bound on the instance. Classes, Parameter and buffer
objects, state-dict keys and module names stay as they are; ``unoptimize``
removes the bound forwards. A fused part runs only when a call-time check
(``_guard``) finds it is the same computation as the modules' own forwards;
otherwise that part runs the modules.
"""
from __future__ import annotations

import copy

from torch import nn

# Importing a family registers it: torchvision's, timm's, then the seed models'.
from . import densenet, inception, mobile, resnet, sequential, timm, vgg  # noqa: F401
from . import anynet, dense1d, highway, preact  # noqa: F401
from ._bind import bind, mark_scriptable, unbind
from ._registry import family_of
from ._report import Part, Report, explain

__all__ = ["Part", "Report", "explain", "optimize", "unoptimize"]


def optimize(model: nn.Module, *, inplace: bool = False, report: bool = False,
             stochastic_depth_prob: float = 0.0):
    """Bind fused forwards on ``model``'s modules (on a deep copy unless
    ``inplace``). Returns the model, or ``(model, explain(model))`` with
    ``report=True``. A module whose forward is already overridden on the
    instance is left alone: its computation is not its class's.
    ``stochastic_depth_prob``: the ResNet blocks' stochastic depth (see
    ``fuse.resnet``; 0 keeps torchvision's blocks exactly)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for m in model.modules():
        family = family_of(m)
        if family is not None and "forward" not in m.__dict__ and family.patterns(m):
            bind(m, family.forward)
    resnet.set_stochastic_depth(model, stochastic_depth_prob)
    mark_scriptable(model)
    return (model, explain(model)) if report else model


def unoptimize(model: nn.Module) -> nn.Module:
    """Remove every fused forward ``optimize`` bound (in place); returns model."""
    for m in model.modules():
        unbind(m)
    return model
