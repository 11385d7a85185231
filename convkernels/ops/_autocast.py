"""Autocast for the fused ops: what ``torch.autocast`` does to the same computation.

Autocast only rewrites the aten ops on its lists; the dispatcher passes our
custom ops through with their arguments untouched, so without help a fused
conv would run in float32 under autocast. torch's rules for the ops we fuse:
a convolution casts its input, weight and bias to the autocast dtype
(float64 excepted), while batch_norm runs in its input's dtype with float32
parameters and running statistics. The fused entry points (the public ops,
the DenseNet blocks) therefore cast the conv tensors with :func:`cast` (and
``conv_bn_act``'s residual, which the fused epilogue adds in the conv output's
dtype), leave every BatchNorm tensor alone (the running statistics are updated in place: a
cast copy would silently drop the update), and run the op under
:func:`disabled`, so that no aten op inside is cast a second time.

Where the fused conv's input is the BatchNorm input (``bn_act_conv``, the
transition) that input is cast too: the normalisation then runs in the
autocast dtype, where torch would normalise a float32 input in float32 and
round only the conv's input. Inside a network under autocast the input is
already in the autocast dtype (the previous conv's output), so both agree.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ._fold import FOLD_CACHE


def dtype(x) -> Optional[torch.dtype]:
    """The dtype autocast gives convolutions on x's device, or None where autocast is off."""
    if not isinstance(x, Tensor):  # the op's own checks reject it
        return None
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def cast(t: Optional[Tensor], to: torch.dtype) -> Optional[Tensor]:
    """``t`` as autocast casts a conv argument: floating tensors other than
    float64 go to ``to``. Differentiable, so gradients reach float32 parameters
    in their own dtype.

    Outside autograd the cast of a parameter is derived data, cached like the
    folded weights (never stale: keyed by identity and version): eval calls
    reuse one copy instead of casting every weight on every call, and the fold
    cache, keyed by the weight tensor it is given, then hits too."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, to):
        return t
    if (isinstance(t, torch.nn.Parameter) and not (t.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()):
        return FOLD_CACHE.get((t,), ("autocast", to), lambda: t.detach().to(to))
    return t.to(to)


def conv_args(x: Tensor, *tensors: Optional[Tensor]) -> tuple:
    """``(x, *tensors)``, the input and parameters of convolutions, as autocast
    would cast them on x's device (unchanged where autocast is off)."""
    low = dtype(x)
    if low is None:
        return (x, *tensors)
    return tuple(cast(t, low) for t in (x, *tensors))


def disabled(x: Tensor):
    """Autocast off on x's device for the enclosed fused computation (a no-op
    context where it is off already)."""
    if dtype(x) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)
