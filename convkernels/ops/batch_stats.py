"""batch_stats: per-channel mean and biased variance of x, differentiable.

Used where the statistics of a tensor are computed once and consumed by several
normalisations (the dense block normalises each channel in every later layer
with the same batch statistics). Its backward adds
``grad_mean / n + grad_var * 2 (x - mean) / n`` to grad_x in one pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ._checks import check_input
from ._library import dense, memory_format
from .primitives import acc_dtype, bn_input


@torch.library.custom_op("convkernels::batch_stats", mutates_args=())
def batch_stats_op(x: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    """(mean, biased var) over N, H, W, in the accumulation dtype, on backend ``impl``."""
    k = backend.kernels(impl)
    return k.channel_stats(bn_input(k, x, memory_format(x)))


@batch_stats_op.register_fake
def _(x, impl):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.size(1), dtype=acc), x.new_empty(x.size(1), dtype=acc)


@torch.library.custom_op("convkernels::batch_stats_backward", mutates_args=())
def batch_stats_backward(grad_mean: Optional[Tensor], grad_var: Optional[Tensor], x: Tensor,
                         mean: Tensor, impl: str) -> Tensor:
    k = backend.kernels(impl)
    n = x.numel() // x.size(1)
    zeros = torch.zeros_like(mean)
    gm = zeros if grad_mean is None else grad_mean
    gv = zeros if grad_var is None else grad_var
    # grad_x = x * (2 gv / n) + (gm - 2 gv mean) / n: an affine map per channel.
    scale = 2 * gv / n
    shift = (gm - 2 * gv * mean) / n
    return k.bn_act_apply(bn_input(k, x, memory_format(x)), scale, shift, None, "identity")


@batch_stats_backward.register_fake
def _(grad_mean, grad_var, x, mean, impl):
    return torch.empty_like(dense(x, memory_format(x)))


def _setup_context(ctx, inputs, output):
    x, impl = inputs
    ctx.save_for_backward(x, output[0])
    ctx.impl = impl


def _backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return torch.ops.convkernels.batch_stats_backward(grad_mean, grad_var, x, mean, ctx.impl), None


batch_stats_op.register_autograd(_backward, setup_context=_setup_context)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of ``x`` over N, H, W, differentiable,
    in float32 (float64 for float64 x). Pass them to ``bn_act_conv(stats=...)``
    to normalise several times with statistics computed once."""
    check_input("batch_stats", x)
    impl = backend.resolve(x.device)
    if impl == "reference":
        acc = x.to(acc_dtype(x.dtype))
        return acc.mean(dim=(0, 2, 3)), acc.var(dim=(0, 2, 3), unbiased=False)
    return torch.ops.convkernels.batch_stats(x, impl)
