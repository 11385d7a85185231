"""conv_act: ``act(conv2d(x, weight, bias) [+ residual])``, a conv and its
activation without BatchNorm (VGG, AlexNet, LeNet, NiN).

* without autograd: one conv with a fused bias + residual + activation
  epilogue (_conv.conv_act: on CPU oneDNN post-ops on a weight prepacked once
  and cached, or a GEMM and one in-place pass for NCHW 1x1 convs; Triton: one
  implicit-GEMM kernel).
* with autograd: the conv (aten's, or a GEMM for 1x1 convs on CPU where that
  pays), then bias + residual + activation in one pass of the backend. Not
  _conv.conv_act: its CPU conv runs on a cached prepacked weight, which
  training changes every step, so the cache would only hold a stale copy of
  every weight. Saves x, weight and what the activation's derivative is
  computed from (see _setup_context); backward is that derivative in one pass,
  then the conv's backward, whose bias gradient is the sum of the same tensor;
  the residual's gradient is that tensor itself.

Ops: ``conv_act`` and ``conv_act.out`` (public, composite), ``conv_act_forward``
/ ``conv_act_backward`` (functional, autograd) and ``conv_act_eval`` /
``conv_act_eval_out`` (inference).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from . import _autocast, _conv, reference
from ._checks import (check_act, check_conv_args, check_input, check_result_like,
                      conv_output_size, pair)
from ._conv import conv2d, conv2d_backward, empty_conv_out
from ._library import (dense, define_with_out, into, memory_format, needs_grad, plain_eager,
                       run_body, strided_like, unpack_grads)
from .conv_bn_act import scratch_like, tuning_key
from .primitives import acc_dtype

OP = "conv_act"


def acc_bias(bias, x):
    """The bias as the epilogues take it: a vector in x's accumulation dtype."""
    return None if bias is None else bias.to(acc_dtype(x.dtype)).contiguous()


# ------------------------------------------------------------------ inference
def _eval(x, weight, bias, stride, padding, dilation, groups, act, residual, impl, out):
    return _conv.conv_act(impl, x, weight, acc_bias(bias, x), stride, padding, dilation,
                          groups, act, residual, out)


@torch.library.custom_op("convkernels::conv_act_eval", mutates_args=())
def conv_act_eval(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, act: str,
                  residual: Optional[Tensor], impl: str) -> Tensor:
    """Inference: one conv with its epilogue. Not differentiable: the public op
    takes conv_act_forward when autograd needs gradients."""
    return _eval(x, weight, bias, stride, padding, dilation, groups, act, residual, impl, None)


@conv_act_eval.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, act, residual, impl):
    return empty_conv_out(x, weight, stride, padding, dilation)


@torch.library.custom_op("convkernels::conv_act_eval_out", mutates_args=("out",))
def conv_act_eval_out(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, act: str,
                      residual: Optional[Tensor], impl: str, out: Tensor) -> None:
    """conv_act_eval written into ``out`` (e.g. a channel slice of a larger buffer)."""
    _eval(x, weight, bias, stride, padding, dilation, groups, act, residual, impl, out)


@conv_act_eval_out.register_fake
def _(*args):
    return None


# -------------------------------------------------------------- autograd path
@torch.library.custom_op("convkernels::conv_act_forward", mutates_args=())
def conv_act_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int, act: str,
                     residual: Optional[Tensor], impl: str) -> tuple[Tensor, Tensor]:
    """Returns (y, z): z the conv output without the bias, from which (with bias
    and residual) backward recomputes the activation's derivative where it needs
    the pre-activation."""
    z = conv2d(x, weight, None, stride, padding, dilation, groups)
    fmt = memory_format(z)
    z = dense(z, fmt)
    y = backend.kernels(impl).bn_act_apply(z, *_conv.unit_scale_shift(bias, z),
                                           dense(residual, fmt), act)
    return y, z


@conv_act_forward.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, act, residual, impl):
    z = empty_conv_out(x, weight, stride, padding, dilation)
    return torch.empty_like(z), z


def _act_grad(k, grad_y, t, shift, residual, act, x):
    """``grad_y * act'(t + shift[c] (+ residual))`` in one pass of backend k
    (bn_act's backward primitive with a unit scale); grad_y itself for identity."""
    if act == "identity":
        return dense(grad_y, memory_format(x))
    fmt = memory_format(t)
    scale, shift = _conv.unit_scale_shift(shift, t)
    # Only the "residual" gradient, which is gz: grad_x's k1..k3 are not read.
    _, gz = k.bn_act_backward_apply(dense(grad_y, fmt), t, scale, shift, dense(residual, fmt),
                                    act, scale, scale, scale, False, True)
    return gz


@torch.library.custom_op("convkernels::conv_act_backward", mutates_args=())
def conv_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, t: Optional[Tensor],
                      shift: Optional[Tensor], residual: Optional[Tensor], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, act: str,
                      has_bias: bool, output_mask: list[bool], impl: str) -> list[Tensor]:
    """Gradients of (x, weight, bias, residual), only those set in output_mask,
    in that order. The activation's derivative is taken at ``t + shift (+
    residual)``: y alone for relu, z + bias (+ residual) for silu and sigmoid,
    nothing (t None) for identity, whose residual gradient is grad_y itself and
    so is not asked of this op (an output may not alias an input)."""
    need_x, need_w, need_b, _ = output_mask
    gz = _act_grad(backend.kernels(impl), grad_y, t, shift, residual, act, x)
    conv_grads = [None, None, None]
    if need_x or need_w or need_b:
        conv_grads = conv2d_backward(gz, x, weight, has_bias, stride, padding, dilation, groups,
                                     [need_x, need_w, need_b])
    grads = (conv_grads[0], strided_like(conv_grads[1], weight), conv_grads[2], gz)
    return [g for g, need in zip(grads, output_mask) if need]


@conv_act_backward.register_fake
def _(grad_y, x, weight, t, shift, residual, stride, padding, dilation, groups, act, has_bias,
      output_mask, impl):
    like = (x, weight, weight.new_empty(weight.size(0)), t)
    return [torch.empty_like(v) for v, need in zip(like, output_mask) if need]


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, act, residual, impl = inputs
    y, z = output
    ctx.mark_non_differentiable(z)
    # What the activation's derivative is computed from. relu: the output
    # (relu' of relu(z) is relu' of z, NaN included), which costs no memory: it
    # is the next layer's input, which autograd keeps there anyway. silu has no
    # derivative in terms of its output, and the backend primitive takes the
    # pre-activation, so silu and sigmoid keep z (bias and residual are inputs,
    # alive anyway). identity: nothing.
    if act == "relu":
        saved = (y, None, None)
    elif act == "identity":
        saved = (None, None, None)
    else:
        saved = (z, bias, residual)
    ctx.save_for_backward(x, weight, *saved)
    ctx.args = (stride, padding, dilation, groups, act, bias is not None, residual is not None)
    ctx.impl = impl


def _backward(ctx, grad_y, _grad_z):
    x, weight, t, shift, residual = ctx.saved_tensors
    stride, padding, dilation, groups, act, has_bias, has_residual = ctx.args
    n = ctx.needs_input_grad
    need_r = has_residual and n[8]
    mask = [n[0], n[1], has_bias and n[2], need_r and act != "identity"]
    gx, gw, gb, gr = unpack_grads(torch.ops.convkernels.conv_act_backward(
        grad_y, x, weight, t, shift, residual, stride, padding, dilation, groups, act, has_bias,
        mask, ctx.impl), mask)
    if need_r and act == "identity":
        gr = grad_y
    return gx, gw, gb, None, None, None, None, None, gr, None


conv_act_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public op
_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
           "int[2] dilation, int groups, str act, Tensor? residual")


def _conv_act(x, weight, bias, stride, padding, dilation, groups, act, residual, out=None):
    if _autocast.dtype(x) is not None:  # the conv and the residual added to it in autocast's dtype
        x, weight, bias, residual = _autocast.conv_args(x, weight, bias, residual)
        with _autocast.disabled(x):
            return _conv_act(x, weight, bias, stride, padding, dilation, groups, act, residual,
                             out)
    stride, padding, dilation = (pair(v, n, OP) for v, n in
                                 ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    check_input(OP, x)
    check_conv_args(OP, x, weight, bias, groups, names=("weight", "bias"))
    shape = (x.size(0), weight.size(0), *conv_output_size(OP, x, weight, stride, padding, dilation))
    check_result_like(OP, "residual", residual, shape, x)
    check_result_like(OP, "out", out, shape, x)
    check_act(OP, act)
    conv = (list(stride), list(padding), list(dilation), groups)
    no_grad = not needs_grad(x, weight, bias, residual)

    def run(name):  # the op on backend ``name``, into a scratch ``out``: no side effects
        scratch = scratch_like(out)
        if no_grad:
            if scratch is None:
                return torch.ops.convkernels.conv_act_eval(x, weight, bias, *conv, act, residual,
                                                           name)
            return torch.ops.convkernels.conv_act_eval_out(x, weight, bias, *conv, act, residual,
                                                           name, scratch)
        return into(torch.ops.convkernels.conv_act_forward(x, weight, bias, *conv, act, residual,
                                                           name)[0], scratch)

    impl = backend.resolve_tuned(
        x.device, (*tuning_key(OP, x, weight, bias, residual, out, conv, act), no_grad), run)
    if impl == "reference":
        y = reference.conv_act(x, weight, bias, stride, padding, dilation, groups, act, residual)
    elif no_grad:
        args = (x, weight, bias, *conv, act, residual, impl)
        if plain_eager(x, weight, bias, residual, out):
            return _eval(*args, out)
        if out is not None:
            torch.ops.convkernels.conv_act_eval_out(*args, out)
            return out
        return torch.ops.convkernels.conv_act_eval(*args)
    else:
        y = torch.ops.convkernels.conv_act_forward(x, weight, bias, *conv, act, residual, impl)[0]
    # With autograd, out= is a copy: the op's own output stays the autograd node.
    return into(y, out)


define_with_out("conv_act", _SCHEMA, _conv_act)


def conv_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
             dilation=1, groups: int = 1, act: str = "relu", residual: Optional[Tensor] = None,
             out: Optional[Tensor] = None) -> Tensor:
    """Fused ``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    [+ residual])``, ``act`` one of relu, identity, silu, sigmoid.

    ``out``: an optional preallocated result, e.g. a channel slice of a larger
    tensor (with autograd it is filled by a copy). Under ``torch.autocast`` x,
    weight, bias and residual are cast to the autocast dtype (as for
    ``F.conv2d``; float64 stays) and the result is in that dtype; where torch
    would promote ``conv(x) + residual`` to a float32 residual's dtype, the
    fused sum stays in the autocast dtype.
    """
    args = (x, weight, bias, pair(stride, "stride", OP), pair(padding, "padding", OP),
            pair(dilation, "dilation", OP), groups, act, residual)
    if run_body(x, weight, bias, residual, out):  # the body, without the dispatcher round trip
        return _conv_act(*args, out=out)
    if out is None:
        return torch.ops.convkernels.conv_act(*args)
    return torch.ops.convkernels.conv_act.out(*args, out=out)
