"""Reference implementations: composites of aten ops.

They define what every fused op computes, serve as the ``reference`` backend,
and are the oracle of the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_ACTS = {
    "relu": F.relu,
    "identity": lambda z: z,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


def activation(z: torch.Tensor, act: str) -> torch.Tensor:
    return _ACTS[act](z)


def bn_act(x, running_mean, running_var, weight=None, bias=None, training=False,
           momentum=0.1, eps=1e-5, act="relu", residual: Optional[torch.Tensor] = None):
    """``act(F.batch_norm(x, ...) [+ residual])``."""
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return activation(z, act)


def add_act(x, residual, act="relu", scale: Optional[torch.Tensor] = None):
    """``act(residual + scale[n] * x)``; ``scale`` is a per-sample vector or None."""
    if scale is not None:
        x = x * scale.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return activation(residual + x, act)
