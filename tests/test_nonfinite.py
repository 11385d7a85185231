"""NaN and Inf where the reference has them: every op, act, mode and backend.

Inputs carry one NaN, one +inf and one -inf. The result of ours and of the
float64 reference (plain torch, convkernels.ops.reference) on the same inputs
must agree exactly in where they are NaN, +inf and -inf, and elsewhere within
the usual fp32 tolerance: outputs, gradients and updated running statistics.
A conv spreads a non-finite input to its neighbours; in training a channel
with one becomes NaN through its batch statistics."""
import pytest
import torch

import convkernels
from convkernels.ops import reference
from convkernels.ops._checks import conv_output_size

from conv_configs import BY_NAME, CPU_1X1
from harness import TARGET_IDS, TARGETS, TOL, make, on, vector

# numpy's warnings about NaN arithmetic, from the Triton interpreter
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ACTS = ("relu", "identity", "silu", "sigmoid")
MODES = ("train", "eval-grad", "eval-no-grad")  # eval-no-grad: BN folded into the conv
LAYOUTS = ("nchw", "channels_last")
# Conv shapes: a 3x3 (oneDNN), and on the cpu backend a 1x1 that runs as a GEMM
# with an in-place epilogue in NCHW (ops/_gemm1x1.py).
CONVS = {"3x3": BY_NAME["3x3"], "1x1-gemm": CPU_1X1[0][0]}
OPS = ("bn_act", "bn_act-residual", "add_act", "conv_bn_act", "conv_bn_act-residual",
       "bn_act_conv")


def _plant(x):
    """x with a NaN, a +inf and a -inf at spread-out places (in place, returns x)."""
    n, c, h, w = x.shape
    x[0, 0, 0, 0] = float("nan")
    x[n - 1, 1 % c, h // 2, w // 2] = float("inf")
    x[0, 2 % c, h - 1, w - 1] = float("-inf")
    return x


def _bn_vectors(c, dev, seed):
    return dict(bn_weight=vector(c, torch.float32, dev, seed, -1.5, 1.5),
                bn_bias=vector(c, torch.float32, dev, seed + 1, -0.5, 0.5),
                running_mean=vector(c, torch.float32, dev, seed + 2, -0.2, 0.2),
                running_var=vector(c, torch.float32, dev, seed + 3, 0.5, 2.0))


def _case(op, target, layout, conv):
    """(tensors by name, the op on a dict of tensors and training)."""
    dev = target.device
    if op.startswith("bn_act") and op != "bn_act_conv" or op == "add_act":
        shape = (2, 3, 4, 5) if target.small else (3, 5, 6, 7)
        t = dict(x=_plant(make(shape, torch.float32, dev, layout)),
                 residual=make(shape, torch.float32, dev, layout, seed=1))
        if op == "add_act":
            t["scale"] = torch.tensor([0.0] + [1.5] * (shape[0] - 1), device=dev)  # 0 * inf = NaN
            return t, lambda f, t, training, act: f.add_act(t["x"], t["residual"], act, t["scale"])
        t.update(_bn_vectors(shape[1], dev, 2))
        if op == "bn_act":
            t["residual"] = None
        return t, lambda f, t, training, act: f.bn_act(
            t["x"], t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], training,
            0.1, 1e-5, act, t["residual"])
    cfg = CONVS[conv].scaled(target.small)
    cin, cout = cfg.cin, cfg.cout
    w = make((cout, cin, cfg.k, cfg.k), torch.float32, dev, seed=1) / (cin * cfg.k ** 2) ** 0.5
    x = _plant(make((cfg.batch, cin, *cfg.hw), torch.float32, dev, layout))
    geometry = ((cfg.stride,) * 2, (cfg.padding,) * 2, (1, 1), 1)
    if op == "bn_act_conv":
        t = dict(x=x, conv_weight=w, **_bn_vectors(cin, dev, 2))
        return t, lambda f, t, training, act: f.bn_act_conv(
            t["x"], t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], training,
            0.1, 1e-5, act, t["conv_weight"], None, *geometry)
    oh, ow = conv_output_size("test", x, w, *geometry[:3])
    t = dict(x=x, conv_weight=w, **_bn_vectors(cout, dev, 2),
             residual=(make((cfg.batch, cout, oh, ow), torch.float32, dev, layout, seed=7)
                       if op == "conv_bn_act-residual" else None))
    return t, lambda f, t, training, act: f.conv_bn_act(
        t["x"], t["conv_weight"], None, t["running_mean"], t["running_var"], t["bn_weight"],
        t["bn_bias"], training, 0.1, 1e-5, *geometry, act, t["residual"])


def assert_same_nonfinite(actual, expected, name):
    """NaN, +inf and -inf at exactly the same places; the finite rest close."""
    for what, mask in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                       ("-inf", torch.isneginf)):
        a, e = mask(actual), mask(expected)
        assert torch.equal(a, e), (f"{name}: {what} at {int(a.sum())} places, the reference "
                                   f"at {int(e.sum())} ({int((a != e).sum())} differ)")
    finite = torch.isfinite(expected)
    atol, rtol = TOL[torch.float32]["grad"]
    torch.testing.assert_close(actual[finite].double(), expected[finite], atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


NOT_DIFFERENTIATED = ("running_mean", "running_var", "scale")


def _leaves(tensors, dtype, with_grad):
    return {k: None if v is None else v.detach().to(dtype, copy=True).requires_grad_(
        with_grad and k not in NOT_DIFFERENTIATED) for k, v in tensors.items()}


def compare(target, tensors, call, training, act, with_grad):
    ours, ref = _leaves(tensors, torch.float32, with_grad), _leaves(tensors, torch.float64,
                                                                    with_grad)
    with on(target), torch.set_grad_enabled(with_grad):
        y = call(convkernels.ops, ours, training, act)
    y_ref = call(reference, ref, training, act)
    assert_same_nonfinite(y, y_ref, "out")
    if with_grad:
        g = make(tuple(y.shape), torch.float64, target.device, seed=42)
        y.backward(g.float())
        y_ref.backward(g)
    for k, v in ours.items():
        if k in ("running_mean", "running_var"):
            assert_same_nonfinite(v, ref[k], k)
        elif with_grad and v is not None and v.requires_grad:
            assert_same_nonfinite(v.grad, ref[k].grad, f"grad {k}")


def _params():
    for op in OPS:
        for conv in (CONVS if "conv" in op else (None,)):
            yield pytest.param(op, conv, id=op if conv is None else f"{op}-{conv}")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("op,conv", list(_params()))
def test_op_nonfinite_like_reference(target, op, conv, act, mode, layout):
    if conv == "1x1-gemm" and target.backend != "cpu":
        pytest.skip("the GEMM path is the cpu backend's")
    tensors, call = _case(op, target, layout, conv)
    compare(target, tensors, call, mode == "train", act, mode != "eval-no-grad")


torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_densenet121_nan_pixel_like_torchvision(mode, layout):
    """One NaN pixel through convkernels' densenet121 and torchvision's with the
    same weights: NaN at the same outputs (and gradients, with autograd)."""
    torch.manual_seed(0)
    ours = convkernels.models.densenet121(num_classes=10)
    tv = torchvision.models.densenet121(num_classes=10)
    tv.load_state_dict(ours.state_dict())
    x = make((2, 3, 32, 32), torch.float32, "cpu", layout)
    x[1, 0, 5, 7] = float("nan")  # sample 0 stays finite but in training (batch statistics)
    training, with_grad = mode == "train", mode != "eval-no-grad"
    results = []
    for m in (ours, tv):
        m.train(training)
        with torch.set_grad_enabled(with_grad):
            y = m(x)
        if with_grad:
            y.backward(torch.ones_like(y))
        results.append((y.detach(), m.features.conv0.weight.grad))
    (y, g), (y_tv, g_tv) = results
    assert_same_nonfinite(y.double(), y_tv.double(), "logits")
    if with_grad:
        assert_same_nonfinite(g.double(), g_tv.double(), "grad features.conv0.weight")
