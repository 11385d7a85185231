"""bn_act_conv: ``conv2d(act(batch_norm(x)))``, the pre-activation pattern
(DenseNet, pre-activation ResNet).

BN-apply + act are applied as the conv loads its input (Triton: in the
implicit-GEMM prologue, padded positions staying zero); other backends
materialise the transformed input transiently. Backward recomputes
``act(bn(x))`` instead of keeping it, so only x and O(C) statistics are saved.

The normalisation statistics are inputs of the core op: batch statistics come
from ``batch_stats`` (differentiable), so a caller may compute them once and
reuse them (the dense block does), or passes them in as ``stats``.

Ops: ``bn_act_conv`` and ``bn_act_conv.out`` (public, composite; the schema
declares the running-stat update), ``bn_act_conv_forward`` /
``bn_act_conv_backward`` (functional, autograd) and ``bn_act_conv_out``
(no autograd, writes into a preallocated output).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from . import _autocast, reference
from ._checks import (check_act, check_bn_args, check_conv_args, check_input, check_result_like,
                      check_vector, conv_output_size, pair)
from ._conv import act_conv, conv2d_backward, empty_conv_out
from .conv_bn_act import scratch_like, tuning_key
from ._fold import bn_scale_shift, eval_scale_shift
from ._library import (define_with_out, into, memory_format, needs_grad, plain_eager,
                       run_body, strided_like, unpack_grads)
from . import batch_stats  # noqa: F401  (registers the op)
from .bn_act import bn_act_grads, update_running_stats  # noqa: F401
from .primitives import acc_dtype, bn_input

OP = "bn_act_conv"


def _forward(x, mean, var, bn_weight, bn_bias, eps, act, conv_weight, conv_bias, stride, padding,
             dilation, groups, impl, out, pack):
    """``pack``: no autograd follows (the CPU backend may use a prepacked conv weight)."""
    scale, shift = bn_scale_shift(bn_weight, bn_bias, mean, torch.rsqrt(var + eps))
    return act_conv(impl, x, scale, shift, act, conv_weight, conv_bias,
                    stride, padding, dilation, groups, out, pack)


@torch.library.custom_op("convkernels::bn_act_conv_forward", mutates_args=())
def bn_act_conv_forward(x: Tensor, mean: Tensor, var: Tensor, bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], eps: float, act: str, conv_weight: Tensor,
                        conv_bias: Optional[Tensor], stride: list[int], padding: list[int],
                        dilation: list[int], groups: int, impl: str,
                        batch_stats: bool = False) -> Tensor:
    """``conv2d(act((x - mean) * rsqrt(var + eps) * bn_weight + bn_bias))``.

    ``batch_stats``: mean and var are x's own batch statistics, given without
    autograd history; backward folds their gradient into grad_x in the same
    pass (instead of a batch_stats backward and an add over x's size)."""
    return _forward(x, mean, var, bn_weight, bn_bias, eps, act, conv_weight, conv_bias, stride,
                    padding, dilation, groups, impl, None, False)


@bn_act_conv_forward.register_fake
def _(x, mean, var, bn_weight, bn_bias, eps, act, conv_weight, conv_bias, stride, padding,
      dilation, groups, impl, batch_stats=False):
    return empty_conv_out(x, conv_weight, stride, padding, dilation)


@torch.library.custom_op("convkernels::bn_act_conv_out", mutates_args=("out",))
def bn_act_conv_out(x: Tensor, mean: Tensor, var: Tensor, bn_weight: Optional[Tensor],
                    bn_bias: Optional[Tensor], eps: float, act: str, conv_weight: Tensor,
                    conv_bias: Optional[Tensor], stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, impl: str, out: Tensor) -> None:
    """bn_act_conv_forward written into ``out`` (e.g. a channel slice of a larger buffer)."""
    _forward(x, mean, var, bn_weight, bn_bias, eps, act, conv_weight, conv_bias, stride, padding,
             dilation, groups, impl, out, True)


@bn_act_conv_out.register_fake
def _(*args):
    return None


@torch.library.custom_op("convkernels::bn_act_conv_backward", mutates_args=())
def bn_act_conv_backward(grad_y: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                         bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                         act: str, conv_weight: Tensor, stride: list[int], padding: list[int],
                         dilation: list[int], groups: int, has_conv_bias: bool,
                         batch_stats: bool, output_mask: list[bool], impl: str) -> list[Tensor]:
    """Gradients of (x, mean, var, bn_weight, bn_bias, conv_weight, conv_bias),
    only those set in output_mask, in that order. Recomputes act(bn(x)).

    ``batch_stats``: mean and var are x's own batch statistics, and grad_x
    includes the path through them (training BN, in the same apply pass); the
    mean and var entries of output_mask must then be False."""
    need_x, need_m, need_v, need_bw, need_bb, need_cw, need_cb = output_mask
    if batch_stats and (need_m or need_v):
        raise ValueError("bn_act_conv_backward: with batch_stats=True the gradients of mean and "
                         "var are part of grad_x; output_mask must not ask for them")
    k = backend.kernels(impl)
    scale, shift = bn_scale_shift(bn_weight, bn_bias, mean, torch.rsqrt(var + eps))
    fmt = memory_format(x)
    t = k.bn_act_apply(bn_input(k, x, fmt), scale, shift, None, act)
    need_t = need_x or need_m or need_v or need_bw or need_bb
    grad_t, grad_cw, grad_cb = conv2d_backward(grad_y, t, conv_weight, has_conv_bias, stride,
                                               padding, dilation, groups,
                                               [need_t, need_cw, need_cb])
    del t
    g = {}
    if need_t:
        g = bn_act_grads(k, grad_t, x, bn_weight, bn_bias, None, mean, var, eps, act,
                         batch_stats=batch_stats, need_x=need_x, need_w=need_bw, need_b=need_bb,
                         need_r=False, need_stats=need_m or need_v)
    grads = (g.get("x"), g.get("mean"), g.get("var"), g.get("weight"), g.get("bias"),
             strided_like(grad_cw, conv_weight),
             grad_cb)
    return [t for t, need in zip(grads, output_mask) if need]


@bn_act_conv_backward.register_fake
def _(grad_y, x, mean, var, bn_weight, bn_bias, eps, act, conv_weight, stride, padding, dilation,
      groups, has_conv_bias, batch_stats, output_mask, impl):
    cb = conv_weight.new_empty(conv_weight.size(0))
    like = (torch.empty_like(x.contiguous(memory_format=memory_format(x))), mean, var, bn_weight,
            bn_bias, conv_weight, cb)
    return [torch.empty_like(t) for t, need in zip(like, output_mask) if need]


def _setup_context(ctx, inputs, output):
    (x, mean, var, bn_weight, bn_bias, eps, act, conv_weight, conv_bias, stride, padding,
     dilation, groups, impl, batch_stats) = inputs
    ctx.save_for_backward(x, mean, var, bn_weight, bn_bias, conv_weight)
    ctx.args = (eps, act, stride, padding, dilation, groups, conv_bias is not None)
    ctx.impl, ctx.batch_stats = impl, batch_stats


def _backward(ctx, grad_y):
    x, mean, var, bn_weight, bn_bias, conv_weight = ctx.saved_tensors
    eps, act, stride, padding, dilation, groups, has_cb = ctx.args
    n = ctx.needs_input_grad
    own = ctx.batch_stats  # then mean and var have no gradient of their own
    mask = [n[0], n[1] and not own, n[2] and not own, bn_weight is not None and n[3],
            bn_bias is not None and n[4], n[7], has_cb and n[8]]
    gx, gm, gv, gbw, gbb, gcw, gcb = unpack_grads(torch.ops.convkernels.bn_act_conv_backward(
        grad_y, x, mean, var, bn_weight, bn_bias, eps, act, conv_weight, stride, padding, dilation,
        groups, has_cb, own, mask, ctx.impl), mask)
    return gx, gm, gv, gbw, gbb, None, None, gcw, gcb, None, None, None, None, None, None


bn_act_conv_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public op
_SCHEMA = ("(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? bn_weight, "
           "Tensor? bn_bias, bool training, float momentum, float eps, str act, Tensor conv_weight, "
           "Tensor? conv_bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
           "Tensor? stats_mean=None, Tensor? stats_var=None")


def _bn_act_conv(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, act,
                 conv_weight, conv_bias, stride, padding, dilation, groups, stats_mean=None,
                 stats_var=None, out=None):
    low = _autocast.dtype(x)
    if low is not None:  # the conv's tensors in autocast's dtype (see _autocast)
        with _autocast.disabled(x):
            return _bn_act_conv(_autocast.cast(x, low), running_mean, running_var, bn_weight,
                                bn_bias, training, momentum, eps, act,
                                _autocast.cast(conv_weight, low), _autocast.cast(conv_bias, low),
                                stride, padding, dilation, groups, stats_mean, stats_var, out)
    stride, padding, dilation = (pair(v, n, OP) for v, n in
                                 ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    check_input(OP, x)
    check_bn_args(OP, x, running_mean, running_var, bn_weight, bn_bias, training,
                  names=("bn_weight", "bn_bias"))
    check_conv_args(OP, x, conv_weight, conv_bias, groups)
    oh, ow = conv_output_size(OP, x, conv_weight, stride, padding, dilation)
    check_result_like(OP, "out", out, (x.size(0), conv_weight.size(0), oh, ow), x)
    check_act(OP, act)
    stats = None
    if stats_mean is not None or stats_var is not None:
        if not training:
            raise ValueError(f"{OP}: stats are the batch statistics of x and are only used when training")
        if stats_mean is None or stats_var is None:
            raise ValueError(f"{OP}: stats must be a pair (mean, var)")
        for name, t in (("stats mean", stats_mean), ("stats var", stats_var)):
            check_vector(OP, name, t, x.size(1), f"the {x.size(1)} channels of x", x)
        stats = (stats_mean, stats_var)

    conv = (list(stride), list(padding), list(dilation), groups)
    acc = acc_dtype(x.dtype)

    # mean and var come from stats, the running stats (eval) or x.detach() (training)
    bn_stats = stats if stats is not None else (() if training else (running_mean, running_var))
    no_grad = not needs_grad(x, bn_weight, bn_bias, conv_weight, conv_bias, *bn_stats)

    def run(name):  # the op on backend ``name``, into a scratch ``out``: no side effects
        c = x.size(1)
        args = (x, x.new_zeros(c, dtype=acc), x.new_ones(c, dtype=acc), bn_weight, bn_bias, eps,
                act, conv_weight, conv_bias, *conv, name)
        scratch = scratch_like(out)
        if scratch is not None and no_grad:
            return torch.ops.convkernels.bn_act_conv_out(*args, scratch)
        return into(torch.ops.convkernels.bn_act_conv_forward(*args), scratch)

    impl = backend.resolve_tuned(
        x.device, (*tuning_key(OP, x, conv_weight, conv_bias, None, out, conv, act), training,
                   stats is None, no_grad), run)
    if impl == "reference":
        return into(reference.bn_act_conv(x, running_mean, running_var, bn_weight, bn_bias,
                                          training, momentum, eps, act, conv_weight, conv_bias,
                                          stride, padding, dilation, groups, stats), out)

    # x's batch statistics computed here carry no autograd history: the op's
    # backward folds their gradient into grad_x (given stats keep their own).
    own_stats = training and stats is None
    if training:
        mean, var = (torch.ops.convkernels.batch_stats(x.detach(), impl) if own_stats
                     else stats)
        mean, var = mean.to(acc), var.to(acc)
        if running_mean is not None:
            torch.ops.convkernels.update_running_stats(
                running_mean, running_var, mean.detach(), var.detach(), momentum,
                x.numel() // x.size(1))
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    args = (x, mean, var, bn_weight, bn_bias, eps, act, conv_weight, conv_bias, list(stride),
            list(padding), list(dilation), groups, impl)
    if no_grad and plain_eager(x, mean, var, bn_weight, bn_bias, conv_weight, conv_bias, out):
        if training:
            return _forward(*args, out, True)
        scale, shift = eval_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps, acc)
        return act_conv(impl, x, scale, shift, act, conv_weight, conv_bias, *conv, out, pack=True)
    if out is not None and no_grad:
        torch.ops.convkernels.bn_act_conv_out(*args, out)
        return out
    # With autograd, out= is a copy: the op's output stays the autograd node.
    return into(torch.ops.convkernels.bn_act_conv_forward(*args, own_stats), out)


define_with_out("bn_act_conv", _SCHEMA, _bn_act_conv)


def bn_act_conv(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5, act: str = "relu",
                conv_weight: Tensor = None, conv_bias: Optional[Tensor] = None, stride=1,
                padding=0, dilation=1, groups: int = 1, stats=None,
                out: Optional[Tensor] = None) -> Tensor:
    """Fused ``F.conv2d(act(F.batch_norm(x, running_mean, running_var, bn_weight,
    bn_bias, training, momentum, eps)), conv_weight, conv_bias, stride, padding,
    dilation, groups)``.

    ``stats``: optional ``(mean, biased var)`` of x's channels, when training and
    already computed (e.g. by ``torch.ops.convkernels.batch_stats``); running
    statistics are updated from them as from the batch. ``out``: an optional
    preallocated result, e.g. a channel slice of a larger tensor (with autograd it
    is filled by a copy).

    Under ``torch.autocast`` x, conv_weight and conv_bias are cast to the
    autocast dtype (float64 stays) and the BN tensors used as they are: the
    normalisation runs in the autocast dtype, where torch would normalise a
    float32 x in float32 and round only the conv's input (identical when x is
    already in the autocast dtype, as inside a network under autocast).
    """
    mean, var = (None, None) if stats is None else stats
    args = (x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, act,
            conv_weight, conv_bias, pair(stride, "stride", OP), pair(padding, "padding", OP),
            pair(dilation, "dilation", OP), groups, mean, var)
    if run_body(x, running_mean, running_var, bn_weight, bn_bias, conv_weight, conv_bias, mean,
                var, out):  # the composite's body, without the dispatcher round trip
        return _bn_act_conv(*args, out=out)
    if out is None:
        return torch.ops.convkernels.bn_act_conv(*args)
    return torch.ops.convkernels.bn_act_conv.out(*args, out=out)
