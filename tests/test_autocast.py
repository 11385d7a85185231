"""ConvBNAct2d / BNActConv2d under torch.autocast behave as the same torch
modules do: the convolution runs in the autocast dtype, BatchNorm in its
input's dtype with float32 parameters and running statistics (updated in
place), and gradients reach the float32 parameters in float32.

Both sides round to the autocast dtype, each in its own order: outputs and
gradients are compared by relative norm error with the harness's fp16/bf16
gradient tolerances, dtypes exactly."""
import pytest
import torch
from torch import nn

from convkernels.nn import BNActConv2d, ConvBNAct2d

from harness import TARGET_IDS, TARGETS, assert_close, make, on, randomise_state, requires

AMP_DTYPES = (torch.bfloat16, torch.float16)


class _EagerConvBNAct(nn.Module):
    def __init__(self, *args, **kw):
        super().__init__()
        self.conv = nn.Conv2d(*args, **kw)
        self.bn = nn.BatchNorm2d(args[1])

    def forward(self, x, residual=None):
        z = self.bn(self.conv(x))
        return torch.relu(z if residual is None else z + residual)


class _EagerBNActConv(nn.Module):
    def __init__(self, *args, **kw):
        super().__init__()
        self.bn = nn.BatchNorm2d(args[0])
        self.conv = nn.Conv2d(*args, bias=True, **kw)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


def _twins(ours, eager, target, training):
    randomise_state(eager)
    ours.load_state_dict(eager.state_dict(), strict=True)
    return ours.to(target.device).train(training), eager.to(target.device).train(training)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _compare(target, dtype, ours, eager, inputs, with_grad):
    """One forward (and backward) of both under autocast on the same inputs."""
    device = inputs[0].device.type
    a = [_leaf(t) if with_grad else t for t in inputs]
    b = [_leaf(t) if with_grad else t for t in inputs]
    with on(target), torch.set_grad_enabled(with_grad), torch.autocast(device, dtype=dtype):
        y = ours(*a)
    with torch.set_grad_enabled(with_grad), torch.autocast(device, dtype=dtype):
        y_e = eager(*b)
    assert y.dtype == y_e.dtype == dtype
    assert_close(y, y_e, dtype, "grad", "out")
    if with_grad:
        g = make(tuple(y.shape), dtype, target.device, seed=42)
        y.backward(g)
        y_e.backward(g)
        for i, (u, v) in enumerate(zip(a, b)):
            assert u.grad.dtype == v.grad.dtype == u.dtype
            assert_close(u.grad, v.grad, dtype, "grad", f"grad input {i}")
        for (name, p), q in zip(ours.named_parameters(), eager.parameters()):
            assert p.grad.dtype == q.grad.dtype == torch.float32, name
            assert_close(p.grad, q.grad, dtype, "grad", f"grad {name}")
    for (name, s), t in zip(ours.named_buffers(), eager.buffers()):
        assert s.dtype == t.dtype, name  # updated in place, never replaced by a cast copy
        if s.is_floating_point():
            assert_close(s, t, dtype, "grad", name)
        else:
            assert torch.equal(s, t), name


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_conv_bn_act_module_under_autocast(target, dtype, mode):
    """float32 input (autocast casts it for the conv); the residual in the
    autocast dtype, as a previous conv-BN block's output is under autocast.
    eval without autograd is the folded-BN path. No conv bias in training: BN
    subtracts the batch mean, so its gradient vanishes and is rounding noise."""
    requires(target, dtype)
    bias = mode != "train"
    ours, eager = _twins(ConvBNAct2d(4, 6, 3, stride=2, padding=1, bias=bias),
                         _EagerConvBNAct(4, 6, 3, stride=2, padding=1, bias=bias), target,
                         mode == "train")
    x = make((3, 4, 9, 9), torch.float32, target.device, seed=1)
    r = make((3, 6, 5, 5), dtype, target.device, seed=2)
    _compare(target, dtype, ours, eager, (x, r), with_grad=mode != "eval-no-grad")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_dtype", ["amp", "fp32"])
def test_bn_act_conv_module_under_autocast(target, dtype, training, x_dtype):
    """x in the autocast dtype (a conv's output, as inside a network: the same
    computation as torch's) and in float32 (cast before the normalisation,
    where torch normalises in float32 and rounds the conv's input)."""
    requires(target, dtype)
    ours, eager = _twins(BNActConv2d(6, 4, 3, padding=1, bias=True),
                         _EagerBNActConv(6, 4, 3, padding=1), target, training)
    x = make((3, 6, 7, 7), dtype if x_dtype == "amp" else torch.float32, target.device, seed=3)
    _compare(target, dtype, ours, eager, (x,), with_grad=True)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_float64_is_not_cast(target):
    """Autocast leaves float64 convolutions alone, and so do the fused ops."""
    requires(target, torch.float64)
    ours = ConvBNAct2d(4, 6, 3, padding=1).to(target.device, torch.float64)
    x = make((2, 4, 6, 6), torch.float64, target.device, seed=4)
    with on(target), torch.autocast(target.device, dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.float64


def test_eval_casts_and_folds_once():
    """Eval without autograd under autocast reuses one cast of each weight and
    one folded weight across calls (the fold cache would otherwise fill with
    entries for a fresh cast per call), and sees an optimizer step."""
    from convkernels.ops._fold import FOLD_CACHE

    eager = _EagerConvBNAct(4, 6, 3, padding=1, bias=False).eval()
    randomise_state(eager)
    ours = ConvBNAct2d(4, 6, 3, padding=1).eval()
    ours.load_state_dict(eager.state_dict(), strict=True)
    x = make((2, 4, 7, 7), torch.float32, "cpu", seed=5)
    FOLD_CACHE.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(5):
            y = ours(x)
        entries = len(FOLD_CACHE._entries)
        with torch.no_grad():
            ours.conv.weight.mul_(0.5)
            eager.conv.weight.mul_(0.5)
        y = ours(x)
        y_e = eager(x)
    assert entries == 2  # the cast weight and the folded (weight, bias)
    assert_close(y, y_e, torch.bfloat16, "grad", "out after the weight changed")
