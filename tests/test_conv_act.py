"""conv_act on every backend against the aten reference, F.conv2d + the activation
(convkernels.ops.reference.conv_act), on the same inputs."""
import pytest
import torch
import torch.nn.functional as F

import convkernels
from convkernels.ops import _gemm1x1, reference
from convkernels.ops._checks import conv_output_size

from conv_configs import BY_NAME, CONFIGS, CPU_1X1, GRADCHECK, IDS
from harness import (TARGET_IDS, TARGETS, Target, assert_close, check_against_reference, make, on,
                     requires, vector)
from test_nonfinite import _plant, assert_same_nonfinite, compare as compare_nonfinite

ACTS = ("relu", "identity", "silu", "sigmoid")
GRAD_NAMES = ("x", "weight", "bias", "residual")
# numpy's warnings about NaN arithmetic, from the Triton interpreter
NAN_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _inputs(target, cfg, dtype, layout, residual, bias, seed=0):
    dev = target.device
    cfg = cfg.scaled(target.small)
    x = make((cfg.batch, cfg.cin, *cfg.hw), dtype, dev, layout, seed)
    w = make((cfg.cout, cfg.cin // cfg.groups, cfg.k, cfg.k), dtype, dev, "nchw", seed + 1)
    w = w / (cfg.cin // cfg.groups * cfg.k * cfg.k) ** 0.5
    b = vector(cfg.cout, dtype, dev, seed + 2, -0.3, 0.3) if bias else None
    s, p, d = cfg.stride, cfg.padding, cfg.dilation
    oh, ow = conv_output_size("test", x, w, (s, s), (p, p), (d, d))
    r = make((cfg.batch, cfg.cout, oh, ow), dtype, dev, layout, seed + 7) if residual else None
    return cfg, dict(x=x, weight=w, bias=b, residual=r)


def _call(fn, cfg, t, act, **kw):
    return fn(t["x"], t["weight"], t["bias"], cfg.stride, cfg.padding, cfg.dilation, cfg.groups,
              act, t["residual"], **kw)


def _compare(target, cfg, tensors, dtype, act, with_grad):
    check_against_reference(
        target, dtype, tensors, GRAD_NAMES,
        lambda t: _call(convkernels.ops.conv_act, cfg, t, act),
        lambda t: _call(reference.conv_act, cfg, t, act), with_grad, buffers=())


MODES = ["autograd", "inference"]  # forward + backward; forward without autograd


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("mode", MODES)
def test_configs(target, cfg, mode):
    for layout, residual, bias in (("nchw", True, False), ("channels_last", False, True),
                                   ("strided", True, True)):
        cfg_s, t = _inputs(target, cfg, torch.float32, layout, residual, bias)
        _compare(target, cfg_s, t, torch.float32, "relu", mode == "autograd")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("mode", MODES)
def test_acts_bias_residual(target, dtype, act, bias, residual, mode):
    requires(target, dtype)
    for layout in ("nchw", "channels_last"):
        cfg_s, t = _inputs(target, BY_NAME["3x3-stride2"], dtype, layout, residual, bias)
        _compare(target, cfg_s, t, dtype, act, mode == "autograd")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
def test_half_dtypes(target, dtype, act, mode):
    requires(target, dtype)
    cfg_s, t = _inputs(target, BY_NAME["3x3"], dtype, "channels_last", True, True)
    # The conv output is rounded to dtype before the activation, so relu's mask
    # flips where it is near 0 and relu gradients cannot match a float64
    # reference; they are checked in fp32 and float64.
    _compare(target, cfg_s, t, dtype, act, mode == "autograd" and act != "relu")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_out_is_a_channel_slice(target, mode):
    """out= writes into a channel slice of a larger buffer and nothing else."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "channels_last", True, True)
    n, cout = cfg.batch, cfg.cout
    buf = torch.full((n, cout + 7, *cfg.hw), 5.0, device=target.device).contiguous(
        memory_format=torch.channels_last)
    view = buf[:, 3:3 + cout]
    leaves = {k: v.clone().requires_grad_(mode == "autograd") for k, v in t.items()}
    with on(target):
        y = _call(convkernels.ops.conv_act, cfg, leaves, "silu", out=view)
    assert y.data_ptr() == view.data_ptr()
    expected = _call(reference.conv_act, cfg, {k: v.double() for k, v in t.items()}, "silu")
    assert_close(view, expected, torch.float32, "grad", "out slice")
    assert torch.all(buf[:, :3] == 5) and torch.all(buf[:, 3 + cout:] == 5)


@pytest.mark.parametrize("case", CPU_1X1, ids=lambda c: c[0].name)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_cpu_1x1_paths(case, layout, mode):
    """The cpu backend runs 1x1 convs as GEMMs or in aten/oneDNN by shape and
    layout (forward, backward and inference): each matches the reference."""
    if not convkernels.backend.available("cpu", "cpu"):
        pytest.skip("convkernels._C not built")
    target = Target("cpu", "cpu", small=False)
    cfg, t = _inputs(target, case[0], torch.float32, layout, True, True)
    x, w, s = t["x"], t["weight"], (cfg.stride, cfg.stride)
    assert _gemm1x1.gemm_pays(x, w, s, (0, 0), 1) == case[1][layout]
    for act in ("relu", "sigmoid"):
        _compare(target, cfg, t, torch.float32, act, mode == "autograd")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(target, act):
    """relu's backward (from the output) and silu's (from the conv output, bias
    and residual) in full; sigmoid and identity share their paths, and the
    interpreted Triton is slow: gradcheck's fast mode (random projections)."""
    if target.device != "cpu":
        pytest.skip("gradcheck runs on CPU")
    cfg, t = _inputs(target, GRADCHECK, torch.float64, "nchw", True, True)
    args = [t[n].requires_grad_(True) for n in GRAD_NAMES]

    def f(x, w, b, r):
        with on(target):
            return convkernels.ops.conv_act(x, w, b, cfg.stride, cfg.padding, 1, 1, act, r)
    fast = target.small or act not in ("relu", "silu")
    assert torch.autograd.gradcheck(f, args, fast_mode=fast)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_gradcheck_grouped_dilated(target):
    """Depthwise, dilated, strided: the conv backward's other arguments."""
    if target.device != "cpu":
        pytest.skip("gradcheck runs on CPU")
    x = make((2, 4, 7, 6), torch.float64, "cpu", seed=1).requires_grad_(True)
    w = (make((4, 1, 3, 3), torch.float64, "cpu", seed=2) / 3).requires_grad_(True)
    b = vector(4, torch.float64, "cpu", 3).requires_grad_(True)

    def f(x, w, b):
        with on(target):
            return convkernels.ops.conv_act(x, w, b, (2, 1), (2, 1), (2, 1), 4, "silu")
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("act", ACTS)
def test_saves_only_what_the_activation_needs(act):
    """relu's backward works from the output (which the next layer keeps
    anyway), identity's from nothing: x, the weight and at most one tensor of
    the result's size are saved; silu and sigmoid keep the conv output too."""
    cfg, t = _inputs(Target("cpu", "cpu", False), BY_NAME["3x3"], torch.float32, "nchw", True,
                     True)
    t = {k: v.requires_grad_(True) for k, v in t.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        y = _call(convkernels.ops.conv_act, cfg, t, act)
    big = [s for s in saved if s.shape == y.shape]
    kept = {"relu": 1, "identity": 0}.get(act, 2)  # silu, sigmoid: z and the residual
    assert len(big) == kept, [tuple(s.shape) for s in saved]
    if act == "relu":
        assert big[0].data_ptr() == y.data_ptr()


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_compile_fullgraph(target):
    """torch.compile keeps the op (no graph break), forward and backward."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "channels_last", True, True)

    def f(x, w, b, r):
        return convkernels.ops.conv_act(x, w, b, 1, 1, 1, 1, "silu", r).sum()

    leaves = [v.clone().requires_grad_(True) for v in t.values()]
    ref_leaves = [v.double().requires_grad_(True) for v in t.values()]
    with on(target):
        y = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
        y.backward()
    y_ref = reference.conv_act(*ref_leaves[:3], 1, 1, 1, 1, "silu", ref_leaves[3]).sum()
    y_ref.backward()
    assert_close(y, y_ref, torch.float32, "grad", "out")
    for name, a, e in zip(GRAD_NAMES, leaves, ref_leaves):
        assert_close(a.grad, e.grad, torch.float32, "grad", f"grad {name}")


def test_make_fx_records_the_op():
    """Eager calls on plain tensors skip the dispatcher; a trace records the op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    cfg, t = _inputs(Target("cpu", "cpu", False), BY_NAME["3x3"], torch.float32, "nchw", False,
                     True)
    w = torch.nn.Parameter(t["weight"])

    def f(x):
        return convkernels.ops.conv_act(x, w, t["bias"], padding=1, act="silu")

    with torch.no_grad():
        gm = make_fx(f)(t["x"])
        called = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert any(c.startswith("convkernels.conv_act") for c in called), called
        assert not any("convolution" in c for c in called), called
        torch.testing.assert_close(gm(t["x"]), f(t["x"]))


# ------------------------------------------------------------------ autocast
AMP_DTYPES = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_autocast(target, dtype, mode):
    """float32 x, weight and bias: the conv runs in the autocast dtype, as
    F.conv2d does under autocast, and gradients reach them in float32."""
    requires(target, dtype)
    cfg, t = _inputs(target, BY_NAME["3x3-stride2"], torch.float32, "nchw", False, True)
    with_grad = mode == "autograd"
    leaves = [{k: None if v is None else v.clone().requires_grad_(with_grad)
               for k, v in t.items()} for _ in range(2)]
    results = []
    for fn, args in ((convkernels.ops.conv_act, leaves[0]), (reference.conv_act, leaves[1])):
        with on(target), torch.set_grad_enabled(with_grad), torch.autocast(target.device,
                                                                           dtype=dtype):
            y = _call(fn, cfg, args, "silu")
        assert y.dtype == dtype
        if with_grad:
            y.backward(make(tuple(y.shape), dtype, target.device, seed=42))
        results.append(y)
    assert_close(results[0], results[1], dtype, "grad", "out")
    if with_grad:
        for name in ("x", "weight", "bias"):
            a, e = leaves[0][name].grad, leaves[1][name].grad
            assert a.dtype == e.dtype == torch.float32
            assert_close(a, e, dtype, "grad", f"grad {name}")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_float64_is_not_cast(target):
    requires(target, torch.float64)
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float64, "nchw", False, True)
    with on(target), torch.autocast(target.device, dtype=torch.bfloat16):
        assert _call(convkernels.ops.conv_act, cfg, t, "relu").dtype == torch.float64


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_inference_mode(target):
    """Inference tensors (a model built under inference_mode) and normal ones."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "channels_last", True, True)
    expected = _call(reference.conv_act, cfg, t, "relu")
    with torch.inference_mode():
        inference = {k: v.clone() for k, v in t.items()}
        with on(target):
            for args in (inference, t):
                y = _call(convkernels.ops.conv_act, cfg, args, "relu")
                assert y.is_inference()
                assert_close(y, expected.double(), torch.float32, "grad", "out")


# ------------------------------------------------------------------ NaN / inf
@NAN_WARNINGS
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("conv", ["3x3", "1x1-gemm"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_nonfinite_like_reference(target, conv, act, mode, layout, residual):
    """NaN, +inf and -inf at exactly the reference's places: outputs and every
    gradient. oneDNN's ReLU post-op would map NaN to 0 (ops/_conv.py runs relu
    as a pass of its own); the 1x1 runs as a GEMM with an in-place epilogue on
    the cpu backend in NCHW."""
    if conv == "1x1-gemm" and target.backend != "cpu":
        pytest.skip("the GEMM path is the cpu backend's")
    cfg = (BY_NAME["3x3"] if conv == "3x3" else CPU_1X1[0][0]).scaled(target.small)
    cfg, t = _inputs(target, cfg, torch.float32, layout, residual, True)
    _plant(t["x"])

    def call(f, t, _training, act):
        return _call(f.conv_act, cfg, t, act)

    compare_nonfinite(target, t, call, False, act, mode == "autograd")


@NAN_WARNINGS
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_bias_and_residual(target, act, mode):
    """Non-finite values entering through the bias and the residual. Against
    the float32 reference: a NaN output next to the zero padding makes torch's
    float64 conv weight gradient NaN at the padded taps (0 * NaN), its float32
    one (oneDNN) skips them, and ours is that float32 conv backward."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "channels_last", True, True)
    t["bias"][0], t["bias"][1] = float("inf"), float("nan")
    _plant(t["residual"])
    with_grad = mode == "autograd"
    leaves = [{k: v.clone().requires_grad_(with_grad) for k, v in t.items()} for _ in range(2)]
    with torch.set_grad_enabled(with_grad):
        with on(target):
            y = _call(convkernels.ops.conv_act, cfg, leaves[0], act)
        y_ref = _call(reference.conv_act, cfg, leaves[1], act)
    assert_same_nonfinite(y, y_ref.double(), "out")
    if with_grad:
        g = make(tuple(y.shape), torch.float32, target.device, seed=42)
        y.backward(g)
        y_ref.backward(g)
        for name in GRAD_NAMES:
            assert_same_nonfinite(leaves[0][name].grad, leaves[1][name].grad.double(),
                                  f"grad {name}")


# ------------------------------------------------------------------ bad input
def _bad_args(**over):
    args = dict(x=torch.randn(2, 4, 6, 6), weight=torch.randn(8, 4, 3, 3), bias=None, stride=1,
                padding=1, dilation=1, groups=1, act="relu", residual=None, out=None)
    args.update(over)
    return args


BAD_CASES = {
    "rank": (dict(x=torch.randn(2, 4, 6)), ValueError, "x must be a 4-D"),
    "int dtype": (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.int64)), TypeError,
                  "x must be float32"),
    "weight rank": (dict(weight=torch.randn(8, 4, 3)), ValueError, "weight must be a 4-D"),
    "input channels": (dict(weight=torch.randn(8, 3, 3, 3)), ValueError,
                       "weight expects 3 input channels"),
    "groups": (dict(groups=3), ValueError, "groups=3 must divide"),
    "kernel too large": (dict(weight=torch.randn(8, 4, 9, 9)), ValueError,
                         "larger than the padded input"),
    "weight dtype": (dict(weight=torch.randn(8, 4, 3, 3).double()), TypeError,
                     "weight has dtype"),
    "weight device": (dict(weight=torch.randn(8, 4, 3, 3, device="meta")), ValueError,
                      "weight is on meta"),
    "bias channels": (dict(bias=torch.ones(4)), ValueError, r"bias must have shape \(8,\)"),
    "bias device": (dict(bias=torch.ones(8, device="meta")), ValueError, "bias is on meta"),
    "residual shape": (dict(residual=torch.randn(2, 8, 5, 6)), ValueError, "residual has shape"),
    "residual dtype": (dict(residual=torch.randn(2, 8, 6, 6).double()), TypeError,
                       "residual has dtype"),
    "out shape": (dict(out=torch.empty(2, 8, 6, 5)), ValueError, "out has shape"),
    "out dtype": (dict(out=torch.empty(2, 8, 6, 6, dtype=torch.float64)), TypeError,
                  "out has dtype"),
    "stride": (dict(stride=0), ValueError, "stride and dilation must be >= 1"),
    "padding pair": (dict(padding=(1, 1, 1)), ValueError, "padding must be an int or a pair"),
    "unknown act": (dict(act="gelu"), ValueError, "unknown act 'gelu'"),
}


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("case", BAD_CASES, ids=str)
def test_rejects(target, case):
    over, exc, message = BAD_CASES[case]
    args = {k: (v.to(target.device) if isinstance(v, torch.Tensor) and v.device.type != "meta"
                else v) for k, v in _bad_args(**over).items()}
    with on(target), pytest.raises(exc, match=message):
        convkernels.ops.conv_act(**args)


def test_defaults_are_f_conv2d_and_relu():
    x, w = make((2, 3, 8, 8), torch.float32, "cpu"), make((5, 3, 3, 3), torch.float32, "cpu")
    torch.testing.assert_close(convkernels.ops.conv_act(x, w), F.relu(F.conv2d(x, w)))
