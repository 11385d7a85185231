"""The compiled CPU kernels of the BN primitives read an ``x`` that is a channel
slice of a larger NCHW or channels_last tensor in place (a DenseNet block's
buffer prefix), instead of from a dense copy.

Each primitive on a slice must give exactly what it gives on a dense copy of
the slice (same arithmetic in the same order), and the ops built on them must
pass the slice through without copying it."""
import pytest
import torch

import convkernels
from convkernels import backend
from convkernels.ops.primitives import CompiledKernels, bn_input

from harness import make

pytestmark = pytest.mark.skipif(not backend.available("cpu", "cpu"),
                                reason="convkernels._C not built")

C_ = torch.ops.convkernels_C
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _slice(fmt, dtype, n=3, c=13, total=20, h=5, w=7, start=2, seed=0):
    """Channels [start, start + c) of a dense [n, total, h, w] tensor in ``fmt``."""
    base = make((n, total, h, w), dtype, "cpu", seed=seed).contiguous(memory_format=FORMATS[fmt])
    x = base[:, start:start + c]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    return x


def _vecs(c, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(c, generator=g) + 0.5 for _ in range(5)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_primitives_on_a_slice_equal_dense_copy(fmt, dtype):
    x = _slice(fmt, dtype)
    xd = x.contiguous(memory_format=FORMATS[fmt])
    c = x.size(1)
    scale, shift, k1, k2, k3 = _vecs(c, 1)
    g = make(tuple(x.shape), dtype, "cpu", seed=2).contiguous(memory_format=FORMATS[fmt])
    for a, b in zip(C_.channel_stats(x), C_.channel_stats(xd)):
        assert torch.equal(a, b)
    y, yd = C_.bn_act_apply(x, scale, shift, None, "relu"), C_.bn_act_apply(xd, scale, shift, None,
                                                                                 "relu")
    assert torch.equal(y, yd) and y.is_contiguous(memory_format=FORMATS[fmt])
    for a, b in zip(C_.bn_act_backward_reduce(g, x, scale, shift, None, "silu", k1),
                    C_.bn_act_backward_reduce(g, xd, scale, shift, None, "silu", k1)):
        assert torch.equal(a, b)
    for a, b in zip(C_.bn_act_backward_apply(g, x, scale, shift, None, "relu", k1, k2, k3, True,
                                             True),
                    C_.bn_act_backward_apply(g, xd, scale, shift, None, "relu", k1, k2, k3, True,
                                             True)):
        assert torch.equal(a, b)
    # In place over the slice (the CPU GEMM conv's epilogue), with a residual:
    # the slice gets bn_act_apply's result, its neighbours stay as they were.
    r = make(tuple(x.shape), dtype, "cpu", seed=3).contiguous(memory_format=FORMATS[fmt])
    expected = C_.bn_act_apply(xd, scale, shift, r, "silu")
    base = x._base.clone()
    C_.bn_act_apply_(x, scale, shift, r, "silu")
    assert torch.equal(x, expected)
    outside = torch.ones(base.size(1), dtype=torch.bool)
    outside[2:2 + c] = False
    assert torch.equal(x._base[:, outside], base[:, outside])


def test_slices_need_the_other_tensors_dense():
    """Only x may be a slice: grad_y / residual slices are rejected, not misread."""
    x = _slice("nchw", torch.float32)
    scale, shift, k1, *_ = _vecs(x.size(1), 3)
    with pytest.raises(RuntimeError, match="channel slice"):
        C_.bn_act_backward_reduce(x, x.contiguous(), scale, shift, None, "relu", k1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ops_pass_slices_through_without_copy(fmt):
    x = _slice(fmt, torch.float32)
    k = CompiledKernels()
    assert bn_input(k, x, FORMATS[fmt]) is x
    # Triton's kernels take dense tensors only: a copy there.
    from convkernels import triton_kernels

    assert bn_input(triton_kernels, x, FORMATS[fmt]) is not x


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_conv_on_a_slice(fmt, training):
    """Forward and backward of bn_act_conv with the slice (grads reach the
    buffer) equal the same op on a dense copy."""
    c, cout = 13, 6
    bn = torch.nn.BatchNorm2d(c)
    conv = torch.nn.Conv2d(c, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    results = []
    for sliced in (True, False):
        base = make((3, 20, 5, 7), torch.float32, "cpu", seed=4).contiguous(
            memory_format=FORMATS[fmt]).requires_grad_(True)
        x = base[:, 2:2 + c]
        if not sliced:
            x = x.contiguous(memory_format=FORMATS[fmt])
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        with convkernels.use_backend("cpu"):
            y = convkernels.ops.bn_act_conv(x, rm, rv, bn.weight, bn.bias, training, 0.1, 1e-5,
                                            "relu", conv.weight, None, 1, 1, 1, 1)
        g = torch.autograd.grad(y, [base, bn.weight, conv.weight], torch.ones_like(y))
        results.append((y, rm, rv, *g))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
