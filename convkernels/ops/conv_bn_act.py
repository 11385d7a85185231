"""conv_bn_act: ``act(batch_norm(conv2d(x)) [+ residual])``.

* eval without autograd: BN folded into the conv weights and bias (cached,
  see _fold.py) and one conv with a fused bias + residual + activation epilogue.
* training (or eval with autograd): conv whose per-channel statistics come
  with it (Triton: from the conv's epilogue), then bn_act's apply pass.
  Saves x and the conv output z (not the BN or activation outputs); backward
  is bn_act's fused backward, then the conv's (aten's, or GEMMs for 1x1 convs
  on CPU where that pays: _conv.py).

Ops: ``conv_bn_act`` and ``conv_bn_act.out`` (public, composite; the schema
declares the running-stat update), ``conv_bn_act_forward`` /
``conv_bn_act_backward`` (functional, autograd) and ``conv_bn_act_eval`` /
``conv_bn_act_eval_out`` (folded inference).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from . import _autocast, reference
from ._checks import (check_act, check_bn_args, check_conv_args, check_input, check_result_like,
                      conv_output_size, pair)
from ._conv import conv2d_backward, conv_act, conv_stats, empty_conv_out
from ._fold import bn_scale_shift, folded_conv_params
from ._library import (dense, define_with_out, into, memory_format, needs_grad, plain_eager,
                       run_body, strided_like, unpack_grads)
from .bn_act import bn_act_grads, update_running_stats  # noqa: F401  (registers the op)
from .primitives import acc_dtype

OP = "conv_bn_act"


def tuning_key(op, x, conv_weight, conv_bias, residual, out, conv, act) -> tuple:
    """The arguments of a conv op that change which GPU backend is faster (see
    backend.resolve_tuned): layouts and channel slices included."""
    return (op, backend.tensor_key(x), backend.tensor_key(conv_weight), conv_bias is not None,
            backend.tensor_key(residual), backend.tensor_key(out), *conv, act)


def scratch_like(out):
    """A tensor with ``out``'s size and strides, for a tuning run to write into."""
    return None if out is None else torch.empty_strided(out.size(), out.stride(),
                                                        dtype=out.dtype, device=out.device)


def _out_shape(x, weight, stride, padding, dilation):
    oh, ow = conv_output_size(OP, x, weight, stride, padding, dilation)
    return (x.size(0), weight.size(0), oh, ow)


# ----------------------------------------------------------- folded inference
def _eval(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
          padding, dilation, groups, act, residual, impl, out):
    w, b = folded_conv_params(conv_weight, conv_bias, running_mean, running_var, bn_weight,
                              bn_bias, eps)
    return conv_act(impl, x, w, b, stride, padding, dilation, groups, act,
                    residual, out)


@torch.library.custom_op("convkernels::conv_bn_act_eval", mutates_args=())
def conv_bn_act_eval(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                     running_mean: Tensor, running_var: Tensor, bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], eps: float, stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, act: str,
                     residual: Optional[Tensor], impl: str) -> Tensor:
    """Inference with BN folded into the conv. Not differentiable: the public op
    takes the training path when autograd needs gradients."""
    return _eval(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps,
                 stride, padding, dilation, groups, act, residual, impl, None)


@conv_bn_act_eval.register_fake
def _(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
      padding, dilation, groups, act, residual, impl):
    return empty_conv_out(x, conv_weight, stride, padding, dilation)


@torch.library.custom_op("convkernels::conv_bn_act_eval_out", mutates_args=("out",))
def conv_bn_act_eval_out(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                         running_mean: Tensor, running_var: Tensor, bn_weight: Optional[Tensor],
                         bn_bias: Optional[Tensor], eps: float, stride: list[int],
                         padding: list[int], dilation: list[int], groups: int, act: str,
                         residual: Optional[Tensor], impl: str, out: Tensor) -> None:
    """conv_bn_act_eval written into ``out`` (e.g. a channel slice of a larger buffer)."""
    _eval(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
          padding, dilation, groups, act, residual, impl, out)


@conv_bn_act_eval_out.register_fake
def _(*args):
    return None


# ----------------------------------------------------------- autograd path
@torch.library.custom_op("convkernels::conv_bn_act_forward", mutates_args=())
def conv_bn_act_forward(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                        bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                        running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        training: bool, eps: float, stride: list[int], padding: list[int],
                        dilation: list[int], groups: int, act: str,
                        residual: Optional[Tensor], impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, z, mean, var): z the conv output (saved for backward), mean
    and var the statistics BN used (batch ones when training)."""
    z, mean, var = conv_stats(impl, x, conv_weight, conv_bias, stride, padding, dilation, groups)
    if not training:
        acc = acc_dtype(x.dtype)
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    scale, shift = bn_scale_shift(bn_weight, bn_bias, mean, torch.rsqrt(var + eps))
    fmt = memory_format(z)
    y = backend.kernels(impl).bn_act_apply(dense(z, fmt), scale, shift, dense(residual, fmt), act)
    return y, z, mean, var


@conv_bn_act_forward.register_fake
def _(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, eps,
      stride, padding, dilation, groups, act, residual, impl):
    z = empty_conv_out(x, conv_weight, stride, padding, dilation)
    c, acc = conv_weight.size(0), acc_dtype(x.dtype)
    return torch.empty_like(z), z, x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


@torch.library.custom_op("convkernels::conv_bn_act_backward", mutates_args=())
def conv_bn_act_backward(grad_y: Tensor, x: Tensor, conv_weight: Tensor, z: Tensor,
                         bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                         residual: Optional[Tensor], mean: Tensor, var: Tensor, training: bool,
                         eps: float, stride: list[int], padding: list[int], dilation: list[int],
                         groups: int, act: str, has_conv_bias: bool,
                         output_mask: list[bool], impl: str) -> list[Tensor]:
    """Gradients of (x, conv_weight, conv_bias, bn_weight, bn_bias, residual),
    only those set in output_mask, in that order."""
    need_x, need_cw, need_cb, need_bw, need_bb, need_r = output_mask
    k = backend.kernels(impl)
    need_z = need_x or need_cw or need_cb
    g = bn_act_grads(k, grad_y, z, bn_weight, bn_bias, residual, mean, var, eps, act,
                     batch_stats=training, need_x=need_z, need_w=need_bw, need_b=need_bb,
                     need_r=need_r)
    conv_grads = [None, None, None]
    if need_z:
        conv_grads = conv2d_backward(g["x"], x, conv_weight, has_conv_bias, stride, padding,
                                     dilation, groups, [need_x, need_cw, need_cb])
    grads = (conv_grads[0], strided_like(conv_grads[1], conv_weight), conv_grads[2],
             g.get("weight"), g.get("bias"), g.get("residual"))
    return [t for t, need in zip(grads, output_mask) if need]


@conv_bn_act_backward.register_fake
def _(grad_y, x, conv_weight, z, bn_weight, bn_bias, residual, mean, var, training, eps, stride,
      padding, dilation, groups, act, has_conv_bias, output_mask, impl):
    cb = conv_weight.new_empty(conv_weight.size(0))
    like = (x, conv_weight, cb, bn_weight, bn_bias, z)
    return [torch.empty_like(t) for t, need in zip(like, output_mask) if need]


def _setup_context(ctx, inputs, output):
    (x, conv_weight, conv_bias, bn_weight, bn_bias, _, _, training, eps, stride, padding,
     dilation, groups, act, residual, impl) = inputs
    _, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    ctx.save_for_backward(x, conv_weight, z, bn_weight, bn_bias, residual, mean, var)
    ctx.args = (training, eps, stride, padding, dilation, groups, act, conv_bias is not None)
    ctx.impl = impl


def _backward(ctx, grad_y, _gz, _gm, _gv):
    x, conv_weight, z, bn_weight, bn_bias, residual, mean, var = ctx.saved_tensors
    training, eps, stride, padding, dilation, groups, act, has_cb = ctx.args
    n = ctx.needs_input_grad
    mask = [n[0], n[1], has_cb and n[2], bn_weight is not None and n[3],
            bn_bias is not None and n[4], residual is not None and n[14]]
    gx, gcw, gcb, gbw, gbb, gr = unpack_grads(torch.ops.convkernels.conv_bn_act_backward(
        grad_y, x, conv_weight, z, bn_weight, bn_bias, residual, mean, var, training, eps, stride,
        padding, dilation, groups, act, has_cb, mask, ctx.impl), mask)
    return gx, gcw, gcb, gbw, gbb, None, None, None, None, None, None, None, None, None, gr, None


conv_bn_act_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public op
_SCHEMA = ("(Tensor x, Tensor conv_weight, Tensor? conv_bias, Tensor(a!)? running_mean, "
           "Tensor(b!)? running_var, Tensor? bn_weight, Tensor? bn_bias, bool training, "
           "float momentum, float eps, int[2] stride, int[2] padding, int[2] dilation, int groups, "
           "str act, Tensor? residual")

def _conv_bn_act(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias,
                 training, momentum, eps, stride, padding, dilation, groups, act, residual,
                 out=None):
    low = _autocast.dtype(x)
    if low is not None:  # the conv (and the residual it is added to) in autocast's dtype
        with _autocast.disabled(x):
            return _conv_bn_act(_autocast.cast(x, low), _autocast.cast(conv_weight, low),
                                _autocast.cast(conv_bias, low), running_mean, running_var,
                                bn_weight, bn_bias, training, momentum, eps, stride, padding,
                                dilation, groups, act, _autocast.cast(residual, low), out)
    stride, padding, dilation = (pair(v, n, OP) for v, n in
                                 ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    check_input(OP, x)
    check_conv_args(OP, x, conv_weight, conv_bias, groups)
    shape = _out_shape(x, conv_weight, stride, padding, dilation)
    check_bn_args(OP, x, running_mean, running_var, bn_weight, bn_bias, training,
                  channels=shape[1], count=shape[0] * shape[2] * shape[3],
                  names=("bn_weight", "bn_bias"))
    check_result_like(OP, "residual", residual, shape, x)
    check_result_like(OP, "out", out, shape, x)
    check_act(OP, act)
    params = (x, conv_weight, conv_bias, bn_weight, bn_bias, residual)
    conv = (list(stride), list(padding), list(dilation), groups)
    folded = not training and not needs_grad(*params)

    def run(name):  # the op on backend ``name``, into a scratch ``out``: no side effects
        scratch = scratch_like(out)
        if folded:
            args = (x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps,
                    *conv, act, residual, name)
            if scratch is None:
                return torch.ops.convkernels.conv_bn_act_eval(*args)
            return torch.ops.convkernels.conv_bn_act_eval_out(*args, scratch)
        y = torch.ops.convkernels.conv_bn_act_forward(
            x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training,
            eps, *conv, act, residual, name)[0]
        return into(y, scratch)

    impl = backend.resolve_tuned(
        x.device, (*tuning_key(OP, x, conv_weight, conv_bias, residual, out, conv, act), folded,
                   training), run)
    if impl == "reference":
        y = reference.conv_bn_act(x, conv_weight, conv_bias, running_mean, running_var, bn_weight,
                                  bn_bias, training, momentum, eps, stride, padding, dilation,
                                  groups, act, residual)
    elif folded:
        args = (x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps,
                list(stride), list(padding), list(dilation), groups, act, residual, impl)
        if plain_eager(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias,
                       residual, out):
            return _eval(*args, out)
        if out is not None:
            torch.ops.convkernels.conv_bn_act_eval_out(*args, out)
            return out
        return torch.ops.convkernels.conv_bn_act_eval(*args)
    else:
        y, _, mean, var = torch.ops.convkernels.conv_bn_act_forward(
            x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training,
            eps, list(stride), list(padding), list(dilation), groups, act, residual, impl)
        if training and running_mean is not None:
            torch.ops.convkernels.update_running_stats(
                running_mean, running_var, mean, var, momentum, shape[0] * shape[2] * shape[3])
    # With autograd, out= is a copy: the op's own output stays the autograd node.
    return into(y, out)


define_with_out("conv_bn_act", _SCHEMA, _conv_bn_act)


def conv_bn_act(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5, stride=1, padding=0, dilation=1,
                groups: int = 1, act: str = "relu", residual: Optional[Tensor] = None,
                out: Optional[Tensor] = None) -> Tensor:
    """Fused ``act(F.batch_norm(F.conv2d(x, conv_weight, conv_bias, stride, padding,
    dilation, groups), running_mean, running_var, bn_weight, bn_bias, training,
    momentum, eps) [+ residual])``.

    In eval mode without autograd, BN is folded into the conv (cached folded
    weights, refreshed whenever a parameter or buffer changes). ``out``: an
    optional preallocated result, e.g. a channel slice of a larger tensor (with
    autograd it is filled by a copy).

    Under ``torch.autocast`` x, conv_weight, conv_bias and residual are cast to
    the autocast dtype (as for ``F.conv2d``; float64 stays), the BN tensors are
    used as they are, and the result (and ``out``) is in the autocast dtype.
    Where torch would promote ``bn(conv(x)) + residual`` to a float32
    residual's dtype, the fused sum stays in the autocast dtype.
    """
    args = (x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, training,
            momentum, eps, pair(stride, "stride", OP), pair(padding, "padding", OP),
            pair(dilation, "dilation", OP), groups, act, residual)
    if run_body(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias,
                residual, out):  # the composite's body, without the dispatcher round trip
        return _conv_bn_act(*args, out=out)
    if out is None:
        return torch.ops.convkernels.conv_bn_act(*args)
    return torch.ops.convkernels.conv_bn_act.out(*args, out=out)
