"""Activation helpers shared by every Triton kernel.

The activation is a compile-time integer (``ACT: tl.constexpr``) so each kernel
is specialised per activation and the inner loops carry no branch. The codes
match ``csrc/activation.h`` (``enum class Act``).
"""
from __future__ import annotations

import triton
import triton.language as tl

IDENTITY = 0
RELU = 1
SILU = 2
SIGMOID = 3

ACT_CODES = {"identity": IDENTITY, "relu": RELU, "silu": SILU, "sigmoid": SIGMOID}


def act_code(act: str) -> int:
    """Integer code of an activation name (raises ValueError for unknown names)."""
    try:
        return ACT_CODES[act]
    except (KeyError, TypeError):
        raise ValueError(
            f"convkernels: unknown act {act!r} (expected one of {', '.join(ACT_CODES)})"
        ) from None


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """act(z), in z's (accumulation) dtype."""
    if ACT == 1:
        y = tl.where(z < 0, 0.0, z)  # NaN passes through, as in torch.relu
    elif ACT == 2:
        y = z * _sigmoid(z)
    elif ACT == 3:
        y = _sigmoid(z)
    else:
        y = z
    return y


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, from the pre-activation z."""
    if ACT == 1:
        d = tl.where(z <= 0, 0.0, 1.0)  # 1 at NaN, as torch's relu passes the gradient
    elif ACT == 2:
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 3:
        s = _sigmoid(z)
        d = s * (1.0 - s)
    else:
        d = tl.full(z.shape, 1.0, z.dtype)
    return d.to(z.dtype)


@triton.jit
def act_bwd(g, z, ACT: tl.constexpr):
    """grad_y * act'(z); relu selects instead of multiplying (no 0 * inf = nan)."""
    if ACT == 1:
        gz = tl.where(z <= 0, 0.0, g)
    elif ACT == 0:
        gz = g
    else:
        gz = g * act_grad(z, ACT)
    return gz
