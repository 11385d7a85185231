"""1x1 convolutions on CPU as MKL GEMMs, where that beats oneDNN.

oneDNN computes NCHW convs in its blocked layout, reordering the input and
the result (and in backward the gradients) around its kernel; on a large
image that is most of a 1x1 conv's time. As GEMMs over NCHW as it is
(weight @ x[n] per sample) they need no reorder. Measured (Intel VM,
2 threads, fp32, batch 32, medians of 7 calls, 2026-12-01),
GEMM vs aten: forward 1.1-3.8x from 28x28 up (512->128 at 28x28: 56 ->
16 ms) and 1.0-1.3x at 14x14 and 7x7 with up to 128k weights, but 0.7-0.9x
at 14x14 and 7x7 with 0.25-1M weights, where oneDNN's kernels beat MKL's
GEMM; backward 1.1-4x at 14x14 and up (1024->128 at 14x14: 58 -> 18 ms)
and 0.85x at 7x7 with 1M weights. At batch 1 the GEMM won on every
ResNet-50 and DenseNet-121 1x1 shape in both directions but the 7x7 ones
with large weights, where inference prefers the prepacked oneDNN conv.
"""
from __future__ import annotations

import torch

# Weights up to this many elements count as small (DenseNet's 1024->128 is 131072).
_SMALL_1X1 = 1 << 17


def _gemm_1x1(x, weight, stride, padding, groups) -> bool:
    """x (NCHW fp32 on CPU) with a 1x1 conv without padding or groups."""
    return (weight.shape[2:] == (1, 1) and groups == 1 and not any(padding)
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous())


def _out_pixels(x, stride) -> int:
    return ((x.size(2) - 1) // stride[0] + 1) * ((x.size(3) - 1) // stride[1] + 1)


def gemm_pays(x, weight, stride, padding, groups) -> bool:
    """Whether the 1x1 conv of x runs forward as a GEMM (module docstring)."""
    if not _gemm_1x1(x, weight, stride, padding, groups):
        return False
    return (x.size(2) * x.size(3) >= 28 * 28 or weight.numel() <= _SMALL_1X1
            or (x.size(0) == 1 and _out_pixels(x, stride) >= 14 * 14))


def gemm_backward_pays(x, weight, stride, padding, groups) -> bool:
    """Whether the 1x1 conv of x runs backward as GEMMs (module docstring)."""
    if not _gemm_1x1(x, weight, stride, padding, groups):
        return False
    return (_out_pixels(x, stride) >= 14 * 14 or weight.numel() <= _SMALL_1X1
            or x.size(0) == 1)


def _strided_pixels(x, stride):
    """x's pixels a 1x1 conv with ``stride`` reads, as an [N, C, pixels] tensor."""
    if tuple(stride) != (1, 1):
        x = x[:, :, ::stride[0], ::stride[1]]
    return x.reshape(x.size(0), x.size(1), -1)


def gemm_conv(x, weight, stride, out=None):
    """conv2d(x, weight) of a 1x1 conv, NCHW: ``weight @ x[n]`` for every
    sample in one batched GEMM, written into ``out`` when given (an NCHW
    tensor or channel slice of one)."""
    cout, cin = weight.shape[:2]
    xs = _strided_pixels(x, stride)
    n, _, p = xs.shape
    if out is None:
        oh, ow = (x.size(2) - 1) // stride[0] + 1, (x.size(3) - 1) // stride[1] + 1
        out = x.new_empty((n, cout, oh, ow))
    torch.bmm(weight.reshape(1, cout, cin).expand(n, cout, cin), xs, out=out.view(n, cout, p))
    return out


def gemm_conv_backward(grad, x, weight, stride, has_bias, mask):
    """(grad_x, grad_weight, grad_bias) of a 1x1 conv (NCHW) as GEMMs: grad_x
    = weight^T @ grad[n] per sample, grad_weight = sum_n grad[n] @ x[n]^T (one
    GEMM per sample accumulated in place: faster here than a batched GEMM and
    a sum)."""
    cout, cin = weight.shape[:2]
    g = grad.contiguous()
    n = g.size(0)
    g3 = g.view(n, cout, -1)
    gx = gw = gb = None
    if mask[0]:
        gt = torch.bmm(weight.reshape(cout, cin).t().expand(n, cin, cout), g3)
        if tuple(stride) == (1, 1):
            gx = gt.view_as(x)
        else:
            gx = x.new_zeros(x.shape)
            gx[:, :, ::stride[0], ::stride[1]] = gt.view(n, cin, *g.shape[2:])
    if mask[1]:
        xs = _strided_pixels(x, stride)
        gw = torch.mm(g3[0], xs[0].t())
        for i in range(1, n):
            gw.addmm_(g3[i], xs[i].t())
        gw = gw.view(cout, cin, 1, 1)
    if mask[2] and has_bias:
        gb = g.sum((0, 2, 3))
    return gx, gw, gb
