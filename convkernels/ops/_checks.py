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


def check_like(op: str, name: str, t: Optional[torch.Tensor], x: torch.Tensor,
               ref: str = "x") -> None:
    """``t`` (if given) must have x's shape, dtype and device; ``ref``: x's name."""
    if t is None:
        return
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {ref} has shape {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref} has dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref} is on {x.device}")


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


def check_bn_args(op: str, x, running_mean, running_var, weight, bias, training: bool, *,
                  channels: int = None, count: int = None, names=("weight", "bias")) -> None:
    """BatchNorm arguments for ``channels`` channels (default: x's) of ``count``
    values each (default: x's N*H*W)."""
    check_input(op, x)
    c = x.size(1) if channels is None else channels
    count = x.numel() // max(x.size(1), 1) if count is None else count
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    (names[0], weight), (names[1], bias)):
        check_vector(op, name, t, c, f"the {c} channels", x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    if training and count <= 1:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got {count} "
            f"(x of shape {tuple(x.shape)})"
        )


def pair(v, name: str, op: str) -> tuple:
    """An int or a pair of ints as a 2-tuple."""
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    return t


def conv_output_size(op: str, x, weight, stride, padding, dilation) -> tuple:
    """(OH, OW) of a conv, with clear errors for impossible configs."""
    out = []
    for i, (size, k) in enumerate(zip(x.shape[2:], weight.shape[2:])):
        if stride[i] < 1 or dilation[i] < 1 or padding[i] < 0:
            raise ValueError(f"{op}: stride and dilation must be >= 1 and padding >= 0, got "
                             f"stride={stride}, padding={padding}, dilation={dilation}")
        span = dilation[i] * (k - 1) + 1
        if size + 2 * padding[i] < span:
            raise ValueError(
                f"{op}: kernel of size {tuple(weight.shape[2:])} (dilation {dilation}) is larger than "
                f"the padded input {tuple(x.shape[2:])} + 2*{padding}")
        out.append((size + 2 * padding[i] - span) // stride[i] + 1)
    return tuple(out)


def check_conv_args(op: str, x, weight, bias, groups: int, *,
                    names=("conv_weight", "conv_bias")) -> None:
    """x [N, Cin, H, W], weight [Cout, Cin/groups, KH, KW] of x's dtype and device;
    ``names``: the op's names of the weight and bias arguments."""
    wname, bname = names
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{op}: {wname} must be a 4-D [Cout, Cin/groups, KH, KW] tensor")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: {wname} has dtype {weight.dtype} but x has dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: {wname} is on {weight.device} but x is on {x.device}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    cout = weight.size(0)
    if x.size(1) % groups or cout % groups:
        raise ValueError(f"{op}: groups={groups} must divide the {x.size(1)} input channels of x "
                         f"and the {cout} output channels of {wname}")
    if weight.size(1) * groups != x.size(1):
        raise ValueError(f"{op}: {wname} expects {weight.size(1) * groups} input channels "
                         f"({weight.size(1)} per group x {groups} groups) but x has {x.size(1)}")
    if bias is not None:
        check_vector(op, bname, bias, cout, f"the {cout} output channels of {wname}", x)


def check_result_like(op: str, name: str, t, shape: tuple, x) -> None:
    """``t`` (if given: a residual or an ``out``) must have the result's shape and
    x's dtype and device."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but the result has shape {tuple(shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
