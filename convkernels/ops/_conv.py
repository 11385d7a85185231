"""Convolution building blocks shared by the fused conv ops, per backend.

``triton`` runs whole fused kernels (implicit GEMM with prologue/epilogue,
convkernels.triton_kernels.conv2d_fused). ``cpu`` and ``cuda`` run the conv
itself in aten (oneDNN / cuDNN) and fuse what surrounds it: on CPU, oneDNN's
post-ops take bias + residual + activation, relu excepted (or, for an NCHW
1x1 conv on a large image, MKL's batched GEMM and one in-place epilogue
pass; for most channels_last inference convs, convkernels' own NHWC kernel
with the whole epilogue: _conv_direct.py); elsewhere the bn_act_apply
primitive is the epilogue.
"""
from __future__ import annotations

import torch

from .. import backend
from ._checks import conv_output_size
from ._conv_direct import direct_pays, direct_plan
from ._fold import FOLD_CACHE
from ._gemm1x1 import gemm_backward_pays, gemm_conv, gemm_conv_backward, gemm_pays
from ._library import dense, into, memory_format
from .primitives import acc_dtype, bn_input, is_channel_slice

# oneDNN post-op names of our activations. oneDNN's relu (and its clip and
# leaky_relu) maps NaN to 0 where torch.relu keeps it, so relu runs as an
# in-place pass after the conv instead: +0-6% over the post-op on ResNet-50
# and DenseNet-121 shapes at batch 32, within noise at batch 1 (Intel VM, 2
# threads). Its swish and sigmoid give NaN and inf where torch does. After a
# fused residual add oneDNN takes no activation: only relu (our pass) and
# identity follow one.
_ONEDNN_ACT = {"relu": "none", "identity": "none", "silu": "swish", "sigmoid": "sigmoid"}
_ACTS_AFTER_ADD = ("relu", "identity")


def empty_conv_out(x, weight, stride, padding, dilation):
    """An uninitialised conv result for ``x``, in x's memory format (as aten's conv)."""
    oh, ow = conv_output_size("conv", x, weight, stride, padding, dilation)
    return torch.empty((x.size(0), weight.size(0), oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(x))


def _triton_conv(x, weight, bias, stride, padding, dilation, groups, out, **fused):
    """conv2d_fused with its result in x's memory format unless ``out`` is given."""
    if out is None:
        out = empty_conv_out(x, weight, stride, padding, dilation)
    return backend.kernels("triton").conv2d_fused(x, weight, bias, stride, padding, dilation,
                                                  groups, out=out, **fused)


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """aten's conv2d, or a GEMM for the 1x1 convs where that pays (_gemm1x1.py)."""
    if gemm_pays(x, weight, stride, padding, groups):
        y = gemm_conv(x, weight, stride)
        return y if bias is None else y.add_(bias.view(1, -1, 1, 1))
    return torch.ops.aten.convolution(x, weight, bias, list(stride), list(padding), list(dilation),
                                      False, [0, 0], groups)


def conv2d_backward(grad, x, weight, has_bias, stride, padding, dilation, groups, mask):
    """aten's convolution_backward (grad_x, grad_weight, grad_bias as ``mask``
    asks), or GEMMs for the 1x1 convs where that pays (_gemm1x1.py)."""
    if gemm_backward_pays(x, weight, stride, padding, groups):
        return gemm_conv_backward(grad, x, weight, stride, has_bias, mask)
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.size(0)] if has_bias else None, list(stride), list(padding),
        list(dilation), False, [0, 0], groups, mask)


def _packed_pays(x, weight, residual, stride, padding, dilation) -> bool:
    """Whether to run oneDNN on a prepacked weight. aten's conv reorders the
    weight into oneDNN's blocked layout on every call, which at batch 1 is most
    of the time of a conv with a large weight (2048->512 1x1 at 7x7: 2.5x). A
    conv on a prepacked weight computes channels_last: free for channels_last
    inputs (1.0-1.1x at batch 32), a layout conversion of the result for NCHW
    ones, which pays only where the weight is several times the result (the
    batch-1 convs of late stages: 1.25-1.8x; 0.6-0.93x at batch 32)."""
    if memory_format(x) == torch.channels_last:
        return True
    if residual is not None:
        return False
    oh, ow = conv_output_size("conv", x, weight, stride, padding, dilation)
    return weight.numel() >= 4 * x.size(0) * weight.size(0) * oh * ow


def _packed_weight(weight, padding, stride, dilation, groups, x):
    """``weight`` in oneDNN's blocked layout, cached until the weight changes.
    The layout is chosen for the first input's shape; oneDNN reorders again for
    a shape that wants another one, so a cached entry is never worse than none."""
    return FOLD_CACHE.get((weight,), ("onednn-packed", *padding, *stride, *dilation, groups),
                          lambda: torch.ops.mkldnn._reorder_convolution_weight(
                              weight.detach(), padding, stride, dilation, groups, list(x.shape)))


def _finish(y, relu, out, fmt):
    """The conv result with the NaN-keeping relu pass, into ``out`` or in ``fmt``."""
    if relu:
        y.relu_()
    if out is not None:
        return into(y, out)
    return y.contiguous(memory_format=fmt)


def _onednn_plan(x, weight, bias, stride, padding, dilation, groups, act, residual):
    """``act(conv2d(x, weight) + bias (+ residual))`` as one oneDNN call (bias,
    residual and act as post-ops; relu as an in-place pass after), for
    inference: on a cached prepacked weight where that pays. The result is in
    x's memory format, or written into ``out``."""
    fmt = memory_format(x)
    args = (list(padding), list(stride), list(dilation), groups)
    if _packed_pays(x, weight, residual, stride, padding, dilation):
        weight = _packed_weight(weight, *args, x)
    else:
        weight = weight.contiguous(memory_format=fmt)
    relu = act == "relu"
    if residual is None:
        post = _ONEDNN_ACT[act]

        def run(x, residual, out):
            y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, post, [], "")
            return _finish(y, relu, out, fmt)
    else:
        def run(x, residual, out):
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, weight, bias, *args, "add", 1.0, None, [], "")
            return _finish(y, relu, out, fmt)
    return run


def unit_scale_shift(bias, z):
    """(ones, bias or zeros) per channel of the conv result z, in its
    accumulation dtype: a bias as the (scale, shift) of bn_act's primitives."""
    ones = torch.ones(z.size(1), dtype=acc_dtype(z.dtype), device=z.device)
    return ones, torch.zeros_like(ones) if bias is None else bias.to(ones.dtype).contiguous()


def _gemm_plan(x, weight, bias, stride, act, residual):
    """A 1x1 conv as a GEMM (into ``out`` when it is an NCHW slice), then bias,
    residual and activation in one pass over the result, in place."""
    epilogue = None
    if bias is not None or residual is not None or act != "identity":
        # The vectors for the result's channels and dtype (an empty stand-in for it).
        epilogue = unit_scale_shift(bias, x.new_empty((0, weight.size(0))))

    def run(x, residual, out):
        direct = out is not None and is_channel_slice(out, torch.contiguous_format)
        y = gemm_conv(x, weight, stride, out if direct else None)
        if epilogue is not None:
            torch.ops.convkernels_C.bn_act_apply_(y, *epilogue, residual, act)
        return y if out is None or direct else into(y, out)
    return run


def cpu_conv_plan(x, weight, bias, stride, padding, dilation, groups, act, residual):
    """How the CPU fp32 inference conv with its epilogue runs for inputs like
    ``x`` and ``residual`` (shape, layout): ``run(x, residual, out)``, holding
    the weight in the layout it needs. A GEMM for a 1x1 conv where that pays,
    convkernels' direct NHWC kernel where that does (_conv_direct.py), else
    oneDNN with post-ops."""
    if direct_pays(x, weight, stride, padding, dilation, groups, act):
        return direct_plan(x, weight, bias, stride, padding, dilation, act, residual, groups)
    if x.is_contiguous() and gemm_pays(x, weight, stride, padding, groups):
        return _gemm_plan(x, weight, bias, stride, act, residual)
    return _onednn_plan(x, weight, bias, stride, padding, dilation, groups, act, residual)


def cpu_conv_ok(x, residual, act) -> bool:
    """Whether :func:`cpu_conv_plan` takes this conv (fp32 CPU, oneDNN, an act
    oneDNN can follow a residual add with)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and (residual is None or act in _ACTS_AFTER_ADD))


def conv_act(name, x, weight, bias, stride, padding, dilation, groups, act, residual, out=None):
    """``act(conv2d(x, weight) + bias (+ residual))`` on backend ``name``, for
    inference (no autograd: the CPU backend uses prepacked weights); written
    into ``out`` when given. ``bias`` is a vector in the accumulation dtype or None."""
    if name == "triton":
        return _triton_conv(x, weight, bias, stride, padding, dilation, groups, out,
                            residual=residual, act=act)[0]
    fmt = memory_format(x)
    x, residual = dense(x, fmt), dense(residual, fmt)
    if name == "cpu" and cpu_conv_ok(x, residual, act):
        return cpu_conv_plan(x, weight, bias, stride, padding, dilation, groups, act,
                             residual)(x, residual, out)
    z = conv2d(x, weight, None, stride, padding, dilation, groups)
    fmt = memory_format(z)
    y = backend.kernels(name).bn_act_apply(dense(z, fmt), *unit_scale_shift(bias, z),
                                           dense(residual, fmt), act)
    return into(y, out)


def conv_stats(name, x, weight, bias, stride, padding, dilation, groups):
    """``z = conv2d(x, weight, bias)`` and its per-channel mean and biased variance
    (Triton: from the conv's epilogue, no extra pass)."""
    if name == "triton":
        bias = None if bias is None else bias.to(acc_dtype(x.dtype))
        return _triton_conv(x, weight, bias, stride, padding, dilation, groups, None, stats=True)
    z = conv2d(x, weight, bias, stride, padding, dilation, groups)
    z = dense(z, memory_format(z))
    mean, var = backend.kernels(name).channel_stats(z)
    return z, mean, var


def act_conv(name, x, scale, shift, act, weight, bias, stride, padding, dilation, groups, out=None,
             pack=False):
    """``conv2d(act(x * scale + shift), weight, bias)``: Triton applies the
    per-channel transform as the conv's input load (zero padding stays zero);
    the others materialise the transformed input first. ``pack``: no autograd
    will follow, the CPU backend may use a prepacked weight."""
    if name == "triton":
        bias = None if bias is None else bias.to(scale.dtype)
        return _triton_conv(x, weight, bias, stride, padding, dilation, groups, out,
                            in_scale=scale, in_shift=shift, in_act=act)[0]
    k = backend.kernels(name)
    t = k.bn_act_apply(bn_input(k, x, memory_format(x)), scale, shift, None, act)
    if pack and name == "cpu" and cpu_conv_ok(t, None, "identity"):
        return cpu_conv_plan(t, weight, bias, stride, padding, dilation, groups, "identity",
                             None)(t, None, out)
    return into(conv2d(t, weight, None if bias is None else bias.to(t.dtype), stride, padding,
                        dilation, groups), out)
