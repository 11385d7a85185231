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
from ._library import dense, into, memory_format
from .primitives import acc_dtype

# oneDNN post-op names of our activations. After a fused residual add oneDNN
# takes relu (or nothing) only.
_ONEDNN_ACT = {"relu": "relu", "identity": "none", "silu": "swish", "sigmoid": "sigmoid"}
_ONEDNN_ACT_AFTER_ADD = {"relu": "relu", "identity": None}


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution(x, weight, bias, list(stride), list(padding), list(dilation),
                                      False, [0, 0], groups)


def _onednn_ok(x) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def conv_act(name, x, weight, bias, stride, padding, dilation, groups, act, residual, out=None):
    """``act(conv2d(x, weight) + bias (+ residual))`` on backend ``name``; written
    into ``out`` when given. ``bias`` is a vector in the accumulation dtype or None."""
    if name == "triton":
        y, _, _ = backend.kernels(name).conv2d_fused(
            x, weight, bias, stride, padding, dilation, groups, residual=residual, act=act, out=out)
        return y
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
        return backend.kernels(name).conv2d_fused(x, weight, bias, stride, padding, dilation, groups,
                                                  stats=True)
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
        y, _, _ = backend.kernels(name).conv2d_fused(
            x, weight, bias, stride, padding, dilation, groups, in_scale=scale, in_shift=shift,
            in_act=act, out=out)
        return y
    t = backend.kernels(name).bn_act_apply(dense(x, memory_format(x)), scale, shift, None, act)
    return into(conv2d(t, weight, None if bias is None else bias.to(t.dtype), stride, padding,
                        dilation, groups), out)
