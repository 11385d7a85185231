"""Argument validation shared by the ops: clear errors naming the argument.

Every check runs before any kernel or running-stat update, so a rejected call
leaves its inputs untouched.
"""
from __future__ import annotations

from typing import Optional

import torch

ACTS = ("relu", "identity", "silu", "sigmoid")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_act(op: str, act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"{op}: unknown act {act!r}; expected one of {ACTS}")


def check_input(op: str, x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be a 4-D [N, C, H, W] tensor, got {x.dim()}-D shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def check_like(op: str, name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """``t`` (if given) must have x's shape, dtype and device."""
    if t is None:
        return
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def check_vector(op: str, name: str, t: Optional[torch.Tensor], size: int, what: str,
                 x: torch.Tensor) -> None:
    """``t`` (if given) must be a 1-D floating vector of ``size`` on x's device."""
    if t is None:
        return
    if t.dim() != 1 or t.numel() != size:
        raise ValueError(f"{op}: {name} must have shape ({size},) to match {what}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    # Mixed precision as in torch: fp16/bf16 activations may carry fp32 parameters.
    if t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, which does not match x ({x.dtype})")


def check_bn_args(op: str, x, running_mean, running_var, weight, bias, training: bool) -> None:
    check_input(op, x)
    c = x.size(1)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_vector(op, name, t, c, f"the {c} channels of x", x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    if training and x.numel() // max(c, 1) <= 1:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got x of shape {tuple(x.shape)}"
        )
