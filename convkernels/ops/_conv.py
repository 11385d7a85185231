"""Convolution building blocks shared by the fused conv ops, per backend.

``triton`` runs whole fused kernels (implicit GEMM with prologue/epilogue,
convkernels.triton_kernels.conv2d_fused). ``cpu`` and ``cuda`` run the conv
itself in aten (oneDNN / cuDNN) and fuse what surrounds it: on CPU, oneDNN's
post-ops take bias + residual + activation; elsewhere the bn_act_apply
primitive is the epilogue.
"""
from __future__ import annotations

import torch

from .. import backend
from ._checks import conv_output_size
from ._library import dense, into, memory_format
from .primitives import acc_dtype, bn_input

# oneDNN post-op names of our activations. After a fused residual add oneDNN
# takes relu (or nothing) only.
_ONEDNN_ACT = {"relu": "relu", "identity": "none", "silu": "swish", "sigmoid": "sigmoid"}
_ONEDNN_ACT_AFTER_ADD = {"relu": "relu", "identity": None}


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
    return torch.ops.aten.convolution(x, weight, bias, list(stride), list(padding), list(dilation),
                                      False, [0, 0], groups)


def _onednn_ok(x) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def conv_act(name, x, weight, bias, stride, padding, dilation, groups, act, residual, out=None):
    """``act(conv2d(x, weight) + bias (+ residual))`` on backend ``name``; written
    into ``out`` when given. ``bias`` is a vector in the accumulation dtype or None."""
    if name == "triton":
        return _triton_conv(x, weight, bias, stride, padding, dilation, groups, out,
                            residual=residual, act=act)[0]
    fmt = memory_format(x)
    x, residual = dense(x, fmt), dense(residual, fmt)
    if name == "cpu" and _onednn_ok(x) and (residual is None or act in _ONEDNN_ACT_AFTER_ADD):
        weight = weight.contiguous(memory_format=fmt)
        args = (weight, bias, list(padding), list(stride), list(dilation), groups)
        if residual is None:
            y = torch.ops.mkldnn._convolution_pointwise(x, *args, _ONEDNN_ACT[act], [], "")
        else:
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, *args, "add", 1.0, _ONEDNN_ACT_AFTER_ADD[act], [], "")
        return into(y, out)
    z = conv2d(x, weight, None, stride, padding, dilation, groups)
    ones = torch.ones(z.size(1), dtype=bias.dtype if bias is not None else torch.float32, device=z.device)
    shift = bias if bias is not None else torch.zeros_like(ones)
    fmt = memory_format(z)
    y = backend.kernels(name).bn_act_apply(dense(z, fmt), ones, shift, dense(residual, fmt), act)
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


def act_conv(name, x, scale, shift, act, weight, bias, stride, padding, dilation, groups, out=None):
    """``conv2d(act(x * scale + shift), weight, bias)``: Triton applies the
    per-channel transform as the conv's input load (zero padding stays zero);
    the others materialise the transformed input first."""
    if name == "triton":
        bias = None if bias is None else bias.to(scale.dtype)
        return _triton_conv(x, weight, bias, stride, padding, dilation, groups, out,
                            in_scale=scale, in_shift=shift, in_act=act)[0]
    k = backend.kernels(name)
    t = k.bn_act_apply(bn_input(k, x, memory_format(x)), scale, shift, None, act)
    return into(conv2d(t, weight, None if bias is None else bias.to(t.dtype), stride, padding,
                        dilation, groups), out)
