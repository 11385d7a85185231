"""bn_act: ``act(batch_norm(x) [+ residual])`` in two passes forward and two backward.

Ops in the ``convkernels`` namespace:

* ``bn_act`` - the public op. Its schema declares the in-place running-stat
  update; it is a composite of the two ops below (or of aten ops on the
  ``reference`` backend), the way aten::batch_norm wraps native_batch_norm.
* ``bn_act_forward`` - functional: y and the per-channel mean and biased
  variance it normalised with. Saves only x (and residual), weight, bias and
  those statistics for backward: the activation's derivative is recomputed
  from x, not stored.
* ``bn_act_backward`` - one reduction pass and one apply pass.
* ``update_running_stats`` - the running-stat update, as in torch (unbiased
  running variance).

BN is folded into a per-channel ``scale``/``shift`` here, once for all backends;
the backends supply only the passes over the big tensors
(see convkernels.ops.primitives).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from . import reference
from ._checks import check_act, check_bn_args, check_like
from ._fold import bn_scale_shift, eval_scale_shift
from ._library import LIB, dense, memory_format, unpack_grads
from .primitives import acc_dtype, bn_input

OP = "bn_act"


# --------------------------------------------------------------------- forward
@torch.library.custom_op("convkernels::bn_act_forward", mutates_args=())
def bn_act_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], training: bool, eps: float,
                   act: str, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean, var): batch statistics when training, else copies of
    the running statistics, in the accumulation dtype. ``impl``: the backend."""
    k = backend.kernels(impl)
    fmt = memory_format(x)
    x, residual = bn_input(k, x, fmt), dense(residual, fmt)
    acc = acc_dtype(x.dtype)
    if training:
        mean, var = k.channel_stats(x)
        scale, shift = bn_scale_shift(weight, bias, mean, torch.rsqrt(var + eps))
    else:
        mean = running_mean.to(acc, copy=True)
        var = running_var.to(acc, copy=True)
        scale, shift = eval_scale_shift(running_mean, running_var, weight, bias, eps, acc)
    y = k.bn_act_apply(x, scale, shift, residual, act)
    return y, mean, var


@bn_act_forward.register_fake
def _(x, weight, bias, residual, running_mean, running_var, training, eps, act, impl):
    c, acc = x.size(1), acc_dtype(x.dtype)
    y = torch.empty_like(dense(x, memory_format(x)))
    return y, x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


# -------------------------------------------------------------------- backward
def bn_act_grads(k, grad_y, x, weight, bias, residual, mean, var, eps, act, *, batch_stats,
                 need_x, need_w, need_b, need_r, need_stats=False):
    """Gradients of ``y = act((x - mean) * invstd * weight + bias (+ residual))``
    with the primitives of backend ``k``: one reduction pass, one apply pass.

    ``batch_stats``: mean and var are x's own batch statistics, and their
    gradient is folded into grad_x. ``need_stats``: mean and var are inputs of
    their own, and their gradients are returned instead.
    Returns a dict with the gradients asked for (x, weight, bias, residual, mean, var).
    """
    fmt = memory_format(x)
    x, grad_y, residual = bn_input(k, x, fmt), dense(grad_y, fmt), dense(residual, fmt)
    invstd = torch.rsqrt(var + eps)
    scale, shift = bn_scale_shift(weight, bias, mean, invstd)
    out = {}
    if batch_stats or need_w or need_b or need_stats:
        sum_gz, sum_gz_xc = k.bn_act_backward_reduce(grad_y, x, scale, shift, residual, act, mean)
        if need_w:
            out["weight"] = (sum_gz_xc * invstd).to(weight.dtype)
        if need_b:
            out["bias"] = sum_gz.to(bias.dtype)
        if need_stats:
            out["mean"] = -scale * sum_gz
            out["var"] = -0.5 * scale * invstd * invstd * sum_gz_xc
    if need_x or need_r:
        if batch_stats:
            # d/dx through the batch statistics: grad_x = k1*gz + k2*x + k3.
            n = x.numel() // x.size(1)
            k2 = -scale * invstd * invstd * sum_gz_xc / n
            k3 = -scale * sum_gz / n - k2 * mean
        else:
            k2 = k3 = torch.zeros_like(scale)
        grad_x, grad_r = k.bn_act_backward_apply(grad_y, x, scale, shift, residual, act,
                                                 scale, k2, k3, need_x, need_r)
        if need_x:
            out["x"] = grad_x
        if need_r:
            out["residual"] = grad_r
    return out


@torch.library.custom_op("convkernels::bn_act_backward", mutates_args=())
def bn_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], mean: Tensor, var: Tensor, training: bool,
                    eps: float, act: str, output_mask: list[bool], impl: str) -> list[Tensor]:
    """Gradients of (x, weight, bias, residual), only those set in output_mask,
    in that order."""
    need_x, need_w, need_b, need_r = output_mask
    grads = bn_act_grads(backend.kernels(impl), grad_y, x, weight, bias,
                         residual, mean, var, eps, act, batch_stats=training, need_x=need_x,
                         need_w=need_w, need_b=need_b, need_r=need_r)
    return [grads[name] for name, need in zip(("x", "weight", "bias", "residual"), output_mask) if need]


@bn_act_backward.register_fake
def _(grad_y, x, weight, bias, residual, mean, var, training, eps, act, output_mask, impl):
    like_x = torch.empty_like(dense(x, memory_format(x)))
    outs = (like_x, weight, bias, like_x)
    return [torch.empty_like(t) for t, need in zip(outs, output_mask) if need]


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _, _, training, eps, act, impl = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, residual, mean, var)
    ctx.args = (training, eps, act)
    ctx.impl = impl


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    x, weight, bias, residual, mean, var = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
            residual is not None and ctx.needs_input_grad[3]]
    gx, gw, gb, gr = unpack_grads(torch.ops.convkernels.bn_act_backward(
        grad_y, x, weight, bias, residual, mean, var, *ctx.args, mask, ctx.impl), mask)
    return gx, gw, gb, gr, None, None, None, None, None, None


bn_act_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------- running stats
@torch.library.custom_op("convkernels::update_running_stats",
                         mutates_args=("running_mean", "running_var"))
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         momentum: float, count: int) -> None:
    """``r = (1 - momentum) * r + momentum * stat`` with the unbiased batch variance."""
    unbiased = var * (count / (count - 1))
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


@update_running_stats.register_fake
def _(running_mean, running_var, mean, var, momentum, count):
    return None


# ------------------------------------------------------------------ public op
LIB.define(
    "bn_act(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
    "Tensor? bias, bool training, float momentum, float eps, str act, Tensor? residual) -> Tensor"
)


def _bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, act, residual):
    check_bn_args(OP, x, running_mean, running_var, weight, bias, training)
    check_like(OP, "residual", residual, x)
    check_act(OP, act)
    impl = backend.resolve(x.device)
    if impl == "reference":
        return reference.bn_act(x, running_mean, running_var, weight, bias, training,
                                momentum, eps, act, residual)
    y, mean, var = torch.ops.convkernels.bn_act_forward(
        x, weight, bias, residual, running_mean, running_var, training, eps, act, impl)
    if training and running_mean is not None:
        torch.ops.convkernels.update_running_stats(
            running_mean, running_var, mean, var, momentum, x.numel() // x.size(1))
    return y


LIB.impl("bn_act", _bn_act, "CompositeImplicitAutograd")


def bn_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
           weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
           act: str = "relu", residual: Optional[Tensor] = None) -> Tensor:
    """Fused ``act(F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps) [+ residual])``.

    Arguments are those of :func:`torch.nn.functional.batch_norm` (same order and
    meaning; in training the running statistics, if given, are updated in place
    with the unbiased batch variance), then ``act`` (``"relu"``, ``"identity"``,
    ``"silu"`` or ``"sigmoid"``) and an optional ``residual`` of x's shape added
    before the activation. ``x`` is ``[N, C, H, W]``, NCHW or channels_last.
    """
    args = (x, running_mean, running_var, weight, bias, training, momentum, eps, act, residual)
    if torch.jit.is_tracing():  # see _library.run_body
        return _bn_act(*args)
    return torch.ops.convkernels.bn_act(*args)
