"""The CPU direct NHWC conv kernel (csrc/cpu/conv_nhwc_cpu.cpp, called through
ops/_conv_direct.py) against F.conv2d in float64, with each instruction set
this CPU has (AVX2 and AVX-512 tiles), on the shapes its tiling splits
differently: output channels not a multiple of its tiles' 16, 32, 48 or 64
channels, pixel counts not a multiple of their 6, 8 or 12 rows (and tiles
across samples), a reduction longer than one 512- or 256-channel block, padding,
stride and dilation; its epilogue (bias, residual, relu keeping NaN, silu,
sigmoid), a channel-slice output, the choice of it by the CPU conv plan, and
its argument checks."""
import pytest
import torch
import torch.nn.functional as F

import convkernels
from convkernels import backend
from convkernels.ops import _conv, _conv_direct
from convkernels.ops._checks import conv_output_size

from harness import make, vector

pytestmark = pytest.mark.skipif(not backend.available("cpu", "cpu"),
                                reason="convkernels._C not built")
AVX2 = backend.available("cpu", "cpu") and torch.ops.convkernels_C.conv_isa() != "none"
needs_avx2 = pytest.mark.skipif(not AVX2, reason="_C built without AVX2")
AVX512 = AVX2 and torch.ops.convkernels_C.conv_isa() == "avx512"

C_ = torch.ops.convkernels_C
CL = torch.channels_last
ACTS = ["relu", "identity", "silu", "sigmoid"]
_TORCH_ACT = {"relu": torch.relu, "identity": lambda z: z, "silu": F.silu,
              "sigmoid": torch.sigmoid}


@pytest.fixture(params=["avx2", pytest.param("avx512", marks=pytest.mark.skipif(
    not AVX512, reason="this CPU has no AVX-512F"))])
def isa(request):
    """The kernel run with each instruction set (set_conv_isa), restored after."""
    before = C_.set_conv_isa(request.param)
    yield request.param
    C_.set_conv_isa(before)

# (batch, cin, cout, k, stride, padding, dilation, (h, w))
SHAPES = {
    "3x3": (2, 16, 32, 3, 1, 1, 1, (7, 9)),
    "cout-tail": (1, 24, 19, 3, 1, 1, 1, (5, 5)),
    "tiles-span-samples": (3, 16, 40, 1, 1, 0, 1, (5, 5)),  # 75 pixels: 13 tiles of 5-6
    "stride2-pad": (2, 20, 33, 3, 2, 2, 1, (9, 10)),
    "dilation2": (1, 16, 16, 3, 1, 2, 2, (8, 8)),
    "5x5": (1, 17, 8, 5, 1, 2, 1, (6, 7)),
    "long-1x1": (1, 1100, 24, 1, 1, 0, 1, (3, 4)),  # one tap split into slices of 512 / 256
    "long-3x3": (1, 300, 20, 3, 1, 1, 1, (4, 4)),  # taps grouped into several blocks
    "wide-odd-panels": (2, 16, 80, 1, 1, 0, 1, (5, 5)),  # AVX-512: 2 tiles of 32, one of 16
    "rows-12-tail": (1, 32, 50, 3, 1, 1, 1, (5, 7)),  # 35 pixels: 3 tiles of 11-12
    "three-vectors": (2, 24, 112, 1, 1, 0, 1, (5, 5)),  # AVX-512: 64 + 48 channels, 6 / 8 rows
    "long-wide": (1, 600, 64, 3, 1, 1, 1, (3, 5)),  # 64-channel tiles over several blocks
    "no-padding-edge": (2, 16, 16, 3, 2, 0, 1, (7, 6)),
}


def _conv_inputs(shape, seed=0, residual=True, bias=True):
    n, cin, cout, k, *_, (h, w) = shape
    x = make((n, cin, h, w), torch.float32, "cpu", seed=seed).contiguous(memory_format=CL)
    wt = make((cout, cin, k, k), torch.float32, "cpu", seed=seed + 1) / (cin * k * k) ** 0.5
    b = vector(cout, torch.float32, "cpu", seed + 2, -0.3, 0.3) if bias else None
    return x, wt, b


def _reference(x, wt, b, r, shape, act):
    s, p, d = shape[4:7]
    z = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), s, p, d)
    if r is not None:
        z = z + r.double()
    return _TORCH_ACT[act](z)


def _direct(x, wt, b, r, shape, act, out=None):
    s, p, d = shape[4:7]
    oh, ow = conv_output_size("test", x, wt, (s, s), (p, p), (d, d))
    if out is None:
        out = torch.empty((x.size(0), wt.size(0), oh, ow)).contiguous(memory_format=CL)
    C_.conv2d_nhwc_(out, x, _conv_direct.pack(wt), b, r, [s, s], [p, p], [d, d], act)
    return out


@needs_avx2
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("epilogue", ["bias+residual", "none"])
def test_matches_conv2d(isa, name, act, epilogue):
    shape = SHAPES[name]
    with_extras = epilogue != "none"
    x, wt, b = _conv_inputs(shape, bias=with_extras)
    oh, ow = conv_output_size("test", x, wt, *[(v, v) for v in shape[4:7]])
    r = None
    if with_extras:
        r = make((shape[0], shape[2], oh, ow), torch.float32, "cpu", seed=7)
        r = r.contiguous(memory_format=CL)
    y = _direct(x, wt, b, r, shape, act)
    torch.testing.assert_close(y.double(), _reference(x, wt, b, r, shape, act),
                               atol=2e-5, rtol=2e-5)


@needs_avx2
def test_writes_a_channel_slice_only(isa):
    shape = SHAPES["stride2-pad"]
    x, wt, b = _conv_inputs(shape)
    base = make((2, 50, 6, 6), torch.float32, "cpu", seed=9).contiguous(memory_format=CL)
    before = base.clone()
    out = base[:, 7:40]
    _direct(x, wt, b, None, shape, "relu", out=out)
    torch.testing.assert_close(out.double(), _reference(x, wt, b, None, shape, "relu"),
                               atol=2e-5, rtol=2e-5)
    assert torch.equal(base[:, :7], before[:, :7]) and torch.equal(base[:, 40:], before[:, 40:])


@needs_avx2
@pytest.mark.parametrize("act", ACTS)
def test_nan_and_inf_as_torch(isa, act):
    """NaN and +-inf in, and the saturated ends of silu and sigmoid (|z| up to
    ~500, past where e^-z overflows or underflows), as torch's activations of
    the float64 conv: silu(-inf) is NaN, sigmoid(-inf) 0, relu(NaN) NaN."""
    shape = SHAPES["3x3"]
    x, wt, b = _conv_inputs(shape)
    x = x * 60
    x[0, 3, 2, 4] = float("nan")
    x[1, 0, 5, 1] = float("inf")
    x[1, 1, 2, 7] = -float("inf")
    r = torch.zeros(2, 32, 7, 9).contiguous(memory_format=CL)
    r[1, 5, 0, 0] = float("nan")
    r[0, 6, 6, 8] = -float("inf")
    y = _direct(x, wt, b, r, shape, act)
    z = _reference(x, wt, b, r, shape, "identity")
    assert z.isnan().any() and z.isinf().any() and z[z.isfinite()].abs().max() > 200
    torch.testing.assert_close(y.double(), _reference(x, wt, b, r, shape, act), atol=2e-5,
                               rtol=2e-5, equal_nan=True)


@needs_avx2
@pytest.mark.parametrize("residual", [False, True])
def test_cpu_conv_plan_runs_it_for_channels_last(monkeypatch, isa, residual):
    """conv_act in inference takes the direct kernel for a channels_last input
    with >= 16 channels (not for NCHW, grouped or 3-channel inputs, nor a 3x3
    conv on a large image: 96x96 output pixels), and gives
    F.conv2d's result, written into ``out`` when asked."""
    calls = []
    plan = _conv.direct_plan
    monkeypatch.setattr(_conv, "direct_plan", lambda *a: calls.append(1) or plan(*a))
    shape = SHAPES["3x3"]
    x, wt, b = _conv_inputs(shape)
    r = make((2, 32, 7, 9), torch.float32, "cpu", seed=5).contiguous(memory_format=CL) \
        if residual else None
    out = torch.empty(2, 40, 7, 9).contiguous(memory_format=CL)[:, 4:36]
    with torch.no_grad():
        y = convkernels.ops.conv_act(x, wt, b, (1, 1), (1, 1), (1, 1), 1, "relu", r)
        convkernels.ops.conv_act(x, wt, b, (1, 1), (1, 1), (1, 1), 1, "relu", r, out=out)
    assert len(calls) == 2
    ref = _reference(x, wt, b, r, shape, "relu")
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        convkernels.ops.conv_act(x.contiguous(), wt, b, (1, 1), (1, 1), (1, 1), 1, "relu", None)
        convkernels.ops.conv_act(x, wt[:, :8], b, (1, 1), (1, 1), (1, 1), 2, "relu", None)
        convkernels.ops.conv_act(x[:, :3], wt[:, :3], b, (1, 1), (1, 1), (1, 1), 1, "relu", None)
        big = make((1, 16, 96, 96), torch.float32, "cpu").contiguous(memory_format=CL)
        convkernels.ops.conv_act(big, wt, b, (1, 1), (1, 1), (1, 1), 1, "relu", None)
    assert len(calls) == 2
    # A 1x1 conv of 16 input channels is taken at any image size.
    with torch.no_grad():
        y = convkernels.ops.conv_act(big, wt[:, :, 1:2, 1:2].contiguous(), b, (1, 1), (0, 0),
                                     (1, 1), 1, "silu", None)
    assert len(calls) == 3
    torch.testing.assert_close(
        y.double(), F.silu(F.conv2d(big.double(), wt[:, :, 1:2, 1:2].double(), b.double())),
        atol=2e-5, rtol=2e-5)
    # With the AVX-512 tiles, any 1x1 conv is taken at any size; with AVX2,
    # one of more than 16 input channels only up to 8192 output pixels.
    wide = make((1, 32, 96, 96), torch.float32, "cpu", seed=4).contiguous(memory_format=CL)
    w1 = make((24, 32, 1, 1), torch.float32, "cpu", seed=6) / 32 ** 0.5
    with torch.no_grad():
        y = convkernels.ops.conv_act(wide, w1, None, (1, 1), (0, 0), (1, 1), 1, "relu", None)
    assert len(calls) == (4 if isa == "avx512" else 3)
    torch.testing.assert_close(y.double(), F.conv2d(wide.double(), w1.double()).relu(),
                               atol=2e-5, rtol=2e-5)


@needs_avx2
def test_packed_weight_follows_the_weight(isa):
    """The cached packed weight is recomputed after an in-place update."""
    shape = SHAPES["3x3"]
    x, wt, b = _conv_inputs(shape)
    with torch.no_grad():
        convkernels.ops.conv_act(x, wt, b, (1, 1), (1, 1), (1, 1), 1, "identity", None)
        wt.mul_(-2)
        y = convkernels.ops.conv_act(x, wt, b, (1, 1), (1, 1), (1, 1), 1, "identity", None)
    torch.testing.assert_close(y.double(), _reference(x, wt, b, None, shape, "identity"),
                               atol=2e-5, rtol=2e-5)


def _bad_calls():
    """{what: (the error it must raise, the arguments)}; out is the first argument."""
    shape = SHAPES["3x3"]
    x, wt, b = _conv_inputs(shape)
    packed = _conv_direct.pack(wt)
    out = torch.zeros(2, 32, 7, 9).contiguous(memory_format=CL)
    conv = ([1, 1], [1, 1], [1, 1])
    same = torch.zeros(2, 16, 7, 9).contiguous(memory_format=CL)  # shaped as x: may be x
    overlap = "unsupported operation"
    return {
        "x-dtype": ("x must be a 4-D float32", (out, x.double(), packed, b, None, *conv, "relu")),
        "x-nchw": ("x must have unit channel stride",
                   (out, x.contiguous(), packed, b, None, *conv, "relu")),
        "out-nchw": ("out must have unit channel stride",
                     (out.contiguous(), x, packed, b, None, *conv, "relu")),
        "packed-layout": ("packed must be a contiguous",
                          (out, x, packed[..., :8], b, None, *conv, "relu")),
        "packed-panels": ("packed has 2 panels", (out[:, :10], x, packed, b, None, *conv, "relu")),
        "out-shape": ("out must be", (out[:, :, :6], x, packed, b, None, *conv, "relu")),
        "act": ("act must be relu, identity, silu or sigmoid",
                (out, x, packed, b, None, *conv, "gelu")),
        "bias": ("bias must be a float32", (out, x, packed, b[:5], None, *conv, "relu")),
        "residual-shape": ("residual must be shaped",
                           (out, x, packed, b, out[:, :, :6], *conv, "relu")),
        "conv-args": ("stride, padding and dilation",
                      (out, x, packed, b, None, [1], [1, 1], [1, 1], "relu")),
        "residual-is-out": (overlap, (out, x, packed, b, out, *conv, "relu")),
        "x-is-out": (overlap, (same, same, _conv_direct.pack(wt[:16]), None, None, *conv, "relu")),
    }


@needs_avx2
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_names_the_argument_and_writes_nothing(case):
    match, args = _bad_calls()[case]
    before = args[0].clone()
    with pytest.raises(RuntimeError, match=match):
        C_.conv2d_nhwc_(*args)
    assert torch.equal(args[0], before)


@needs_avx2
def test_set_conv_isa_names_its_argument():
    before = C_.conv_isa()
    with pytest.raises(RuntimeError, match="isa must be 'avx2' or 'avx512', got 'sse'"):
        C_.set_conv_isa("sse")
    if not AVX512:
        with pytest.raises(RuntimeError, match="this CPU has no AVX-512F"):
            C_.set_conv_isa("avx512")
    assert C_.conv_isa() == before


@pytest.mark.skipif(AVX2, reason="the error of a build without AVX2")
def test_without_avx2_it_refuses_and_the_plan_does_not_take_it():
    shape = SHAPES["3x3"]
    x, wt, b = _conv_inputs(shape)
    assert not _conv_direct.direct_pays(x, wt, (1, 1), (1, 1), (1, 1), 1, "relu")
    with pytest.raises(RuntimeError, match="without AVX2"):
        _direct(x, wt, b, None, shape, "relu")


# ---------------------------------------------------------------- depthwise
# dwconv2d_nhwc_: (batch, channels, k, stride, padding, dilation, (h, w)), on
# what its loops split differently: 4-pixel interior blocks and their
# remainder, edge columns on both sides (none inside at all), rows cut by the
# padding, and the channel groups (AVX-512: 144 = 3 groups of 3 vectors, 20 =
# 2 vectors with a tail, 8 less than one vector).
DW_SHAPES = {
    "3x3": (1, 20, 3, 1, 1, 1, (9, 11)),
    "5x5-stride2": (2, 144, 5, 2, 2, 1, (9, 9)),
    "3x3-stride2-nopad": (1, 8, 3, 2, 0, 1, (7, 8)),
    "dilation2": (1, 40, 3, 1, 2, 2, (8, 7)),
    "5x5-no-interior": (1, 72, 5, 1, 2, 1, (3, 3)),
    "wide-row": (1, 48, 3, 1, 1, 1, (2, 23)),
}


def _dw(shape, bias=True, residual=True, seed=0):
    """(the kernel's result, the float64 reference) for a DW_SHAPES entry."""
    n, c, k, s, p, d, (h, w) = shape
    x = make((n, c, h, w), torch.float32, "cpu", seed=seed).contiguous(memory_format=CL)
    wt = make((c, 1, k, k), torch.float32, "cpu", seed=seed + 1) / k
    b = vector(c, torch.float32, "cpu", seed + 2, -0.3, 0.3) if bias else None
    oh, ow = conv_output_size("test", x, wt, (s, s), (p, p), (d, d))
    r = make((n, c, oh, ow), torch.float32, "cpu", seed=7).contiguous(memory_format=CL) \
        if residual else None
    return x, wt, b, r


def _dw_run(x, wt, b, r, shape, act):
    n, c, k, s, p, d, _ = shape
    oh, ow = conv_output_size("test", x, wt, (s, s), (p, p), (d, d))
    out = torch.empty((n, c, oh, ow)).contiguous(memory_format=CL)
    C_.dwconv2d_nhwc_(out, x, _conv_direct.pack_depthwise(wt), b, r, [s, s], [p, p], [d, d], act)
    return out


def _dw_reference(x, wt, b, r, shape, act):
    s, p, d = shape[3:6]
    z = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), s, p, d,
                 groups=x.size(1))
    return _TORCH_ACT[act](z if r is None else z + r.double())


@needs_avx2
@pytest.mark.parametrize("name", DW_SHAPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("epilogue", ["bias+residual", "none"])
def test_depthwise_matches_conv2d(isa, name, act, epilogue):
    shape = DW_SHAPES[name]
    x, wt, b, r = _dw(shape, bias=epilogue != "none", residual=epilogue != "none")
    torch.testing.assert_close(_dw_run(x, wt, b, r, shape, act).double(),
                               _dw_reference(x, wt, b, r, shape, act), atol=2e-5, rtol=2e-5)


@needs_avx2
@pytest.mark.parametrize("act", ACTS)
def test_depthwise_nan_and_inf_as_torch(isa, act):
    shape = DW_SHAPES["3x3"]
    x, wt, b, r = _dw(shape)
    x = x * 60
    x[0, 3, 2, 4] = float("nan")
    x[0, 0, 5, 0] = float("inf")  # an edge column
    x[0, 1, 2, 7] = -float("inf")
    r[0, 5, 0, 0] = float("nan")
    z = _dw_reference(x, wt, b, r, shape, "identity")
    assert z.isnan().any() and z.isinf().any()
    torch.testing.assert_close(_dw_run(x, wt, b, r, shape, act).double(),
                               _dw_reference(x, wt, b, r, shape, act), atol=2e-5, rtol=2e-5,
                               equal_nan=True)


@needs_avx2
def test_cpu_conv_plan_takes_depthwise_at_batch_1_and_3x3(isa):
    c = 24
    wt = make((c, 1, 3, 3), torch.float32, "cpu", seed=1)
    w5 = make((c, 1, 5, 5), torch.float32, "cpu", seed=1)
    for n, fmt, w, groups, want in [(1, CL, wt, c, True), (2, CL, wt, c, True),
                                    (1, CL, w5, c, True), (2, CL, w5, c, False),
                                    (1, torch.contiguous_format, wt, c, False),
                                    (1, CL, make((c, 12, 3, 3), torch.float32, "cpu"), 2, False)]:
        x = make((n, c, 6, 6), torch.float32, "cpu", seed=2).contiguous(memory_format=fmt)
        assert _conv_direct.direct_pays(x, w, (1, 1), (1, 1), (1, 1), groups, "silu") is want
    x = make((1, c, 6, 6), torch.float32, "cpu", seed=2).contiguous(memory_format=CL)
    y = _conv.cpu_conv_plan(x, wt, None, (2, 2), (1, 1), (1, 1), c, "silu", None)(x, None, None)
    torch.testing.assert_close(y, F.silu(F.conv2d(x, wt, None, 2, 1, 1, c)), atol=2e-6, rtol=2e-6)


@needs_avx2
@pytest.mark.parametrize("bad, match", [
    (lambda x, p, out: (out, x, p[..., :4], None, None), "dwconv2d_nhwc_: packed must be"),
    (lambda x, p, out: (out[:, :5], x, p, None, None), "out must have x's 8 channels"),
    (lambda x, p, out: (out, x.contiguous(), p, None, None), "x must have unit channel stride"),
    (lambda x, p, out: (out, x, p, None, out[:, :, :1]), "residual must be shaped as out"),
])
def test_depthwise_bad_input_names_the_argument(bad, match):
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=CL)
    p = _conv_direct.pack_depthwise(torch.randn(8, 1, 3, 3))
    out = torch.empty(1, 8, 5, 5).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match=match):
        C_.dwconv2d_nhwc_(*bad(x, p, out), [1, 1], [1, 1], [1, 1], "relu")
