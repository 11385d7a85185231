"""1x1 convolutions on CPU as MKL GEMMs, where that beats oneDNN.

NCHW: oneDNN computes NCHW convs in its blocked layout, reordering the input
and the result (and in backward the gradients) around its kernel; on a large
image that is most of a 1x1 conv's time. As GEMMs over NCHW as it is
(weight @ x[n] per sample) they need no reorder. channels_last: a 1x1 conv is
one GEMM of the [pixels, channels] matrix; oneDNN is as fast at batch 32 but
slower on few pixels (the dense block's batch slices), where its per-call
weight reorder and setup weigh most.

Measured (Intel VM, 2 threads, fp32, medians of 7-9 calls, 2026-12-01), GEMM
vs aten:
* NCHW, batch 32: forward 1.1-3.8x from 28x28 up (512->128 at 28x28: 56 ->
  16 ms) and 1.0-1.3x at 14x14 and 7x7 with up to 128k weights, but 0.7-0.9x
  at 14x14 and 7x7 with 0.25-1M weights, where oneDNN's kernels beat MKL's
  GEMM; backward 1.1-4x at 14x14 and up (1024->128 at 14x14: 58 -> 18 ms) and
  0.85x at 7x7 with 1M weights. Batch 1: the GEMM won on every ResNet-50 and
  DenseNet-121 1x1 shape in both directions but the 7x7 ones with large
  weights, where inference prefers the prepacked oneDNN conv.
* channels_last (12 DenseNet/ResNet shapes): forward 1.0-2.2x at batch 1,
  0.85-1.7x at batch 4, 0.85-1.07x at batch 32 (hence: up to 56*56 pixels in
  all); backward 1.0-5.7x at batch 1 (2x in total), 1.07-1.46x from 28x28 down
  at batch 4 and 32, 0.72-1.02x at 56x56 with more than one sample.
Inference in channels_last keeps oneDNN (a prepacked weight, _conv.py).
"""
from __future__ import annotations

import torch

# Weights up to this many elements count as small (DenseNet's 1024->128 is 131072).
_SMALL_1X1 = 1 << 17


def _layout(x, weight, stride, padding, groups):
    """"nchw" or "cl" (x's dense layout) where a GEMM can compute this conv: a
    1x1 conv without padding or groups, on fp32 CPU tensors; else None."""
    if (weight.shape[2:] != (1, 1) or groups != 1 or any(padding) or x.device.type != "cpu"
            or x.dtype != torch.float32):
        return None
    if x.is_contiguous():
        return "nchw"
    return "cl" if x.is_contiguous(memory_format=torch.channels_last) else None


def _out_pixels(x, stride) -> int:
    return ((x.size(2) - 1) // stride[0] + 1) * ((x.size(3) - 1) // stride[1] + 1)


def gemm_pays(x, weight, stride, padding, groups) -> bool:
    """Whether the 1x1 conv of x runs forward as a GEMM (module docstring)."""
    layout = _layout(x, weight, stride, padding, groups)
    if layout == "nchw":
        return (x.size(2) * x.size(3) >= 28 * 28 or weight.numel() <= _SMALL_1X1
                or (x.size(0) == 1 and _out_pixels(x, stride) >= 14 * 14))
    return layout == "cl" and x.size(0) * _out_pixels(x, stride) <= 56 * 56


def gemm_backward_pays(x, weight, stride, padding, groups) -> bool:
    """Whether the 1x1 conv of x runs backward as GEMMs (module docstring)."""
    layout = _layout(x, weight, stride, padding, groups)
    if layout == "nchw":
        return (_out_pixels(x, stride) >= 14 * 14 or weight.numel() <= _SMALL_1X1
                or x.size(0) == 1)
    return layout == "cl" and (x.size(0) == 1 or _out_pixels(x, stride) <= 28 * 28)


def _strided(x, stride):
    """The pixels of x a 1x1 conv with ``stride`` reads (a view or a copy)."""
    return x if tuple(stride) == (1, 1) else x[:, :, ::stride[0], ::stride[1]]


def _rows(t):
    """A channels_last [N, C, H, W] tensor as its [N*H*W, C] matrix of pixels
    (a view when t is channels_last-contiguous)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.size(1))


def _from_rows(m, n, h, w):
    """The inverse of _rows: [N*H*W, C] -> channels_last [N, C, H, W], a view."""
    return m.view(n, h, w, m.size(1)).permute(0, 3, 1, 2)


def gemm_conv(x, weight, stride, out=None):
    """conv2d(x, weight) of a 1x1 conv in x's layout. NCHW: ``weight @ x[n]``
    for every sample in one batched GEMM, written into ``out`` when given (an
    NCHW tensor or channel slice of one). channels_last: one GEMM of the pixel
    matrix by weight^T, into a new tensor (``out`` is for NCHW only)."""
    cout, cin = weight.shape[:2]
    xs = _strided(x, stride)
    n, _, oh, ow = xs.shape
    w2 = weight.reshape(cout, cin)
    if not x.is_contiguous():
        return _from_rows(torch.mm(_rows(xs), w2.t()), n, oh, ow)
    if out is None:
        out = x.new_empty((n, cout, oh, ow))
    torch.bmm(w2.expand(n, cout, cin), xs.reshape(n, cin, oh * ow),
              out=out.view(n, cout, oh * ow))
    return out


def gemm_conv_backward(grad, x, weight, stride, has_bias, mask):
    """(grad_x, grad_weight, grad_bias) of a 1x1 conv as GEMMs, in x's layout.
    NCHW: grad_x = weight^T @ grad[n] per sample, grad_weight = sum_n grad[n] @
    x[n]^T (one GEMM per sample accumulated in place: faster here than a
    batched GEMM and a sum). channels_last: grad_x = G @ weight and grad_weight
    = G^T @ X on the pixel matrices, one GEMM each."""
    cout, cin = weight.shape[:2]
    w2 = weight.reshape(cout, cin)
    cl = not x.is_contiguous()
    g = grad.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    n, _, oh, ow = g.shape
    gx = gw = gb = None
    if mask[0]:
        if cl:
            gt = _from_rows(torch.mm(_rows(g), w2), n, oh, ow)
        else:
            gt = torch.bmm(w2.t().expand(n, cin, cout), g.view(n, cout, oh * ow)).view(
                n, cin, oh, ow)
        if tuple(stride) == (1, 1):
            gx = gt
        else:
            gx = torch.zeros_like(x)
            gx[:, :, ::stride[0], ::stride[1]] = gt
    if mask[1]:
        xs = _strided(x, stride)
        if cl:
            gw = torch.mm(_rows(g).t(), _rows(xs))
        else:
            g3, x3 = g.view(n, cout, -1), xs.reshape(n, cin, -1)
            gw = torch.mm(g3[0], x3[0].t())
            for i in range(1, n):
                gw.addmm_(g3[i], x3[i].t())
        gw = gw.view(cout, cin, 1, 1)
    if mask[2] and has_bias:
        gb = g.sum((0, 2, 3))
    return gx, gw, gb
