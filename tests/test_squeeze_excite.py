"""squeeze_excite (csrc/cpu/squeeze_excite_cpu.cpp) and the fused CPU inference
forward of torchvision's SqueezeExcitation (fuse/mobile.py), against
torchvision's own forward: the kernel against it in float64 on the same weights
and inputs, the fused forward against an unoptimized copy, and every case that
must run torchvision's forward (autograd, hooks, autocast, other activations,
the reference backend) with the kernel's calls counted."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import misc

import convkernels
from convkernels import explain, optimize
from harness import assert_close, make

ACTS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}
SHAPES = [(1, 20, 13, 11), (3, 40, 7, 7), (2, 8, 1, 1)]


def block(c=20, cr=6, act=nn.SiLU, gate=nn.Sigmoid, bias=True, seed=0):
    torch.manual_seed(seed)
    se = misc.SqueezeExcitation(c, cr, activation=act, scale_activation=gate).eval()
    if not bias:
        se.fc1, se.fc2 = nn.Conv2d(c, cr, 1, bias=False), nn.Conv2d(cr, c, 1, bias=False)
    with torch.no_grad():  # gates away from 0.5, so that a wrong pooled value shows
        se.fc2.weight.mul_(4.0)
    return se


def kernel(se, x):
    return torch.ops.convkernels_C.squeeze_excite(
        x, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, ACTS[type(se.activation)],
        ACTS[type(se.scale_activation)])


def reference(se, x):
    with torch.no_grad():
        return type(se).forward(copy.deepcopy(se).double(), x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU], ids=lambda a: a.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_torchvision(dtype, layout, act, shape):
    se = block(shape[1], 6, act)
    x = make(shape, dtype, "cpu", layout, seed=1, offset=0.3)
    y = kernel(se.to(dtype), x)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert_close(y, reference(se, x), dtype, "out", "y")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_without_biases(layout):
    se = block(bias=False)
    x = make((2, 20, 9, 9), torch.float32, "cpu", layout, seed=2)
    assert_close(torch.ops.convkernels_C.squeeze_excite(x, se.fc1.weight, None, se.fc2.weight,
                                                         None, "silu", "sigmoid"),
                 reference(se, x), torch.float32, "out", "y")


def test_kernel_nonfinite_like_torchvision():
    """A NaN in one sample makes that sample's gates, and so its whole output,
    NaN (as torchvision's mean does); an inf gives inf * gate where the gate is
    finite and non-zero. The other sample is untouched."""
    se = block().double()
    x = make((2, 20, 5, 5), torch.float64, "cpu", "channels_last", seed=3)
    x[0, 3, 1, 1] = float("nan")
    x[1, 5, 2, 2] = float("inf")
    y, ref = kernel(se, x), reference(se, x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y[0]).all()
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    torch.testing.assert_close(y, ref, equal_nan=True, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("args, match", [
    (lambda se, x: (x[0], se.fc1.weight, None, se.fc2.weight, None), "4-D"),
    (lambda se, x: (x.int(), se.fc1.weight, None, se.fc2.weight, None), "unsupported dtype Int"),
    (lambda se, x: (x.half(), se.fc1.weight, None, se.fc2.weight, None), "float32 or float64"),
    (lambda se, x: (x, se.fc2.weight, None, se.fc2.weight, None), "w1 must be"),
    (lambda se, x: (x, se.fc1.weight, None, se.fc1.weight, None), "w2 must be"),
    (lambda se, x: (x, se.fc1.weight, se.fc2.bias, se.fc2.weight, None), "b1 must have shape"),
    (lambda se, x: (x, se.fc1.weight, None, se.fc2.weight.double(), None), "w2 must have dtype"),
    (lambda se, x: (x[:, :, :0], se.fc1.weight, None, se.fc2.weight, None), "no pixels"),
    (lambda se, x: (x[..., ::2], se.fc1.weight, None, se.fc2.weight, None), "contiguous"),
])
def test_kernel_bad_input_names_the_argument(args, match):
    se = block()
    x = torch.randn(2, 20, 6, 6)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.convkernels_C.squeeze_excite(*args(se, x), "silu", "sigmoid")


# ------------------------------------------------------------ fused forward
@pytest.fixture
def kernel_calls(monkeypatch):
    count = [0]
    op = torch.ops.convkernels_C.squeeze_excite

    def counted(*args):
        count[0] += 1
        return op(*args)
    monkeypatch.setattr(torch.ops.convkernels_C, "squeeze_excite", counted)
    return count


def pair(**kw):
    ref = block(**kw)
    return ref, optimize(copy.deepcopy(ref))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_inference_runs_the_kernel(layout, context, kernel_calls):
    ref, opt = pair()
    x = make((2, 20, 9, 9), torch.float32, "cpu", layout, seed=4)
    with getattr(torch, context)():
        y, want = opt(x), ref(x)
    assert kernel_calls[0] == 1
    assert_close(y, want.double(), torch.float32, "out", "y")


def test_efficientnet_fuses_every_block(kernel_calls):
    torch.manual_seed(0)
    ref = torchvision.models.efficientnet_b0().eval()
    opt = optimize(copy.deepcopy(ref))
    blocks = [n for n, m in opt.named_modules() if type(m) is misc.SqueezeExcitation]
    parts = [p for p in explain(opt) if p.op.startswith("squeeze_excite")]
    assert {p.module for p in parts} == set(blocks) and all(p.fused for p in parts)
    assert {c for p in parts for c in p.covers} >= {f"{b}.{c}" for b in blocks for c in ("fc1", "fc2")}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y, want = opt(x), ref(x)
    assert kernel_calls[0] == len(blocks) == 16
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_autograd_runs_torchvision(kernel_calls):
    ref, opt = pair()
    x = torch.randn(2, 20, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    opt(x).sum().backward()
    ref(x2).sum().backward()
    assert kernel_calls[0] == 0
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(opt.fc1.weight.grad, ref.fc1.weight.grad)


@pytest.mark.parametrize("child", ["avgpool", "fc1", "activation", "fc2", "scale_activation"])
def test_hook_on_a_child_runs_torchvision(child, kernel_calls):
    ref, opt = pair()
    seen = []
    getattr(opt, child).register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 20, 5, 5)
    with torch.no_grad():
        y = opt(x)
        torch.testing.assert_close(y, ref(x))
    assert kernel_calls[0] == 0 and len(seen) == 1
    assert f"{child} has a forward hook" in [p.reason for p in explain(opt)][0]


def test_replaced_child_and_instance_scale_run_torchvision(kernel_calls):
    ref, opt = pair()
    opt.activation = ref.activation = nn.GELU()
    x = torch.randn(2, 20, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), ref(x))
    opt2 = optimize(block())
    opt2._scale = lambda x: torch.ones_like(x[:, :, :1, :1])
    with torch.no_grad():
        torch.testing.assert_close(opt2(x), x)
    assert kernel_calls[0] == 0


def test_hardsigmoid_gate_is_not_bound(kernel_calls):
    """MobileNetV3's SE: its gate is one the op does not compute."""
    ref, opt = pair(act=nn.ReLU, gate=nn.Hardsigmoid)
    assert not [p for p in explain(opt) if p.op.startswith("squeeze_excite")]
    x = torch.randn(2, 20, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), ref(x))
    assert kernel_calls[0] == 0


def test_autocast_and_reference_backend_run_torchvision(kernel_calls):
    ref, opt = pair()
    x = torch.randn(2, 20, 5, 5)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(opt(x), ref(x))
        with convkernels.use_backend("reference"):
            torch.testing.assert_close(opt(x), ref(x))
    assert kernel_calls[0] == 0
