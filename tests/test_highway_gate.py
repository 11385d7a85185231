"""highway_gate (h * sigmoid(gate) + x * (1 - sigmoid(gate))) on every backend
against the eager formula, and the highway layers of models.highway_net that
run it."""
import copy

import pytest
import torch
from torch.library import opcheck

import convkernels

from harness import TARGET_IDS, TARGETS, Target, make, on, requires

# numpy's warnings about NaN arithmetic, from the Triton interpreter
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

REFERENCE = Target("reference", "cpu", False)
ALL_TARGETS = TARGETS + [REFERENCE]
ALL_IDS = TARGET_IDS + ["reference"]

# (atol, rtol) against the formula in float64 on the same inputs. One pass,
# one rounding to the dtype at the end; the eager formula in bf16 rounds five
# times, which these bounds also cover.
TOL = {
    torch.float64: {"out": (1e-12, 1e-12), "grad": (1e-12, 1e-12)},
    torch.float32: {"out": (1e-6, 1e-6), "grad": (1e-6, 1e-6)},
    torch.float16: {"out": (2e-3, 2e-3), "grad": (2e-3, 2e-3)},
    torch.bfloat16: {"out": (2e-2, 2e-2), "grad": (2e-2, 2e-2)},
}
SHAPES = {"small": (2, 3, 4, 5), "odd": (3, 7, 5, 3), "ones": (1, 1, 1, 1),
          "wide": (2, 37, 9, 11)}


def _eager(h, gate, x):
    t = torch.sigmoid(gate)
    return h * t + x * (1 - t)


def _inputs(shape, dtype, device, layout):
    return [make(shape, dtype, device, layout, seed=s) * m for s, m in ((1, 1.0), (2, 2.0), (3, 1.0))]


def _run(target, fn, tensors, grad_out):
    """fn's output and the gradients of the leaf copies of tensors."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    with on(target):
        y = fn(*leaves)
    y.backward(grad_out)
    return y, [t.grad for t in leaves]


def _close(actual, expected, dtype, kind, name):
    atol, rtol = TOL[dtype][kind]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("target", ALL_TARGETS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                         ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "strided"))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_eager_formula(target, dtype, layout, shape):
    requires(target, dtype)
    if target.small and shape == "wide":
        pytest.skip("small shapes in the Triton interpreter")
    tensors = _inputs(SHAPES[shape], dtype, target.device, layout)
    g = make(SHAPES[shape], dtype, target.device, seed=4)
    y, grads = _run(target, convkernels.ops.highway_gate, tensors, g)
    y64, grads64 = _run(REFERENCE, _eager, [t.double() for t in tensors], g.double())
    assert y.dtype == dtype and y.shape == y64.shape
    if layout == "channels_last" and tensors[0].dim() == 4 and 1 not in SHAPES[shape][1:]:
        assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, y64, dtype, "out", "out")
    for name, a, b in zip(("h", "gate", "x"), grads, grads64):
        _close(a, b, dtype, "grad", f"grad {name}")


@pytest.mark.skipif(not convkernels.backend.available("cpu", "cpu"), reason="no _C")
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_cpu_fp32_rounds_as_eager(layout):
    """Same form, no FMA contraction: the CPU kernel's fp32 output and
    gradients are the eager formula's within an ulp or two (the sigmoid's
    exp is at::vec's, as torch.sigmoid's)."""
    tensors = _inputs((4, 16, 13, 17), torch.float32, "cpu", layout)
    g = make((4, 16, 13, 17), torch.float32, "cpu", seed=4)
    y, grads = _run(Target("cpu", "cpu", False), convkernels.ops.highway_gate, tensors, g)
    ye, grads_e = _run(REFERENCE, _eager, tensors, g)
    for a, b in zip([y, *grads], [ye, *grads_e]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=3e-7)  # bit for bit on the dev VMs


@pytest.mark.parametrize("target", ALL_TARGETS, ids=ALL_IDS)
@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, True, True)], ids=lambda m: "".join("hgx"[i] for i in range(3) if m[i]))
def test_only_needed_gradients(target, mask):
    tensors = [t.requires_grad_(need) for t, need in
               zip(_inputs((2, 3, 4, 5), torch.float32, target.device, "nchw"), mask)]
    with on(target):
        convkernels.ops.highway_gate(*tensors).sum().backward()
    ref = [t.detach().double().requires_grad_(need) for t, need in zip(tensors, mask)]
    _eager(*ref).sum().backward()
    for t, r in zip(tensors, ref):
        assert (t.grad is None) == (r.grad is None)
        if t.grad is not None:
            _close(t.grad, r.grad, torch.float32, "grad", "grad")


@pytest.mark.parametrize("target", ALL_TARGETS, ids=ALL_IDS)
def test_gradcheck_float64(target):
    if target.device != "cpu":
        pytest.skip("gradcheck runs on CPU")
    shape = (2, 2, 2, 3) if target.small else (2, 3, 4, 5)
    tensors = [t.requires_grad_(True) for t in _inputs(shape, torch.float64, "cpu", "nchw")]

    def f(*args):
        with on(target):
            return convkernels.ops.highway_gate(*args)

    assert torch.autograd.gradcheck(f, tensors)
    assert torch.autograd.gradgradcheck(f, tensors) if target.backend == "reference" else True


@pytest.mark.parametrize("target", ALL_TARGETS, ids=ALL_IDS)
def test_opcheck(target):
    ops = torch.ops.convkernels
    h, gate, x = (t.requires_grad_(True) for t in _inputs((2, 3, 4, 5), torch.float32,
                                                           target.device, "nchw"))
    cl = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
          for t in (h, gate, x)]
    with on(target):
        opcheck(ops.highway_gate, (h, gate, x))
        opcheck(ops.highway_gate, tuple(cl))
        if target.backend != "reference":
            impl = target.backend
            g = torch.randn_like(h)
            opcheck(ops.highway_gate_forward, (h, gate, x, impl))
            for mask in ([True, True, True], [False, True, False]):
                opcheck(ops.highway_gate_backward,
                        (g, h.detach(), gate.detach(), x.detach(), mask, impl))


def _planted(device, small):
    shape = (2, 3, 4, 5) if small else (3, 5, 6, 7)
    h, gate, x = _inputs(shape, torch.float32, device, "nchw")
    gate[0, 0, 0, 0] = float("inf")   # t = 1: h passes, x * 0
    gate[0, 0, 0, 1] = float("-inf")  # t = 0: x passes, h * 0
    gate[1, 1, 1, 1] = float("nan")
    gate[0, 0, 0, 2] = float("inf")
    x[0, 0, 0, 2] = float("inf")      # inf * (1 - 1) = NaN, as in the formula
    h[0, 0, 0, 1] = float("-inf")     # -inf * 0 = NaN
    h[1, 2, 3, 4] = float("inf")      # t in (0, 1): inf
    x[1, 0, 2, 3] = float("nan")
    h[0, 1, 0, 0], x[0, 1, 0, 0] = float("inf"), float("inf")  # g h - g x = inf - inf
    return [h, gate, x]


def _nonfinite(t):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


@pytest.mark.parametrize("target", ALL_TARGETS, ids=ALL_IDS)
def test_nonfinite_where_the_formula_has_them(target):
    """Outputs and all three gradients: NaN, +inf and -inf exactly where the
    eager formula in the same dtype has them, equal elsewhere."""
    tensors = _planted(target.device, target.small)
    g = make(tuple(tensors[0].shape), torch.float32, target.device, seed=4)
    g[1, 0, 1, 1] = float("inf")  # a non-finite incoming gradient too
    ours = _run(target, convkernels.ops.highway_gate, tensors, g)
    eager = _run(REFERENCE, _eager, tensors, g)
    for name, a, b in zip(("out", "grad h", "grad gate", "grad x"),
                          [ours[0], *ours[1]], [eager[0], *eager[1]]):
        for which, ma, mb in zip(("nan", "+inf", "-inf"), _nonfinite(a), _nonfinite(b)):
            assert torch.equal(ma, mb), f"{name}: {which} at {ma.nonzero().tolist()} vs {mb.nonzero().tolist()}"
        finite = torch.isfinite(b)
        assert finite.any()
        _close(a[finite], b[finite], torch.float32, "out", name)


@pytest.mark.parametrize("args, err, match", [
    (((2, 3, 4, 5), (2, 3, 4, 4), (2, 3, 4, 5)), ValueError, r"gate has shape \(2, 3, 4, 4\) but h"),
    (((2, 3, 4, 5), (2, 3, 4, 5), (1, 3, 4, 5)), ValueError, r"x has shape \(1, 3, 4, 5\) but h"),
    (((3, 4, 5), (3, 4, 5), (3, 4, 5)), ValueError, r"h must be a 4-D"),
    (((2, 3, 4, 5), (3, 4, 5), (2, 3, 4, 5)), ValueError, r"gate has shape \(3, 4, 5\)"),
], ids=["gate-shape", "x-shape", "rank", "gate-rank"])
def test_bad_shapes(args, err, match):
    h, gate, x = (torch.randn(s) for s in args)
    with pytest.raises(err, match="highway_gate: " + match):
        convkernels.ops.highway_gate(h, gate, x)


def test_bad_dtype_device_and_type():
    h = torch.randn(2, 3, 4, 5)
    with pytest.raises(TypeError, match="highway_gate: gate has dtype torch.float64 but h has dtype torch.float32"):
        convkernels.ops.highway_gate(h, h.double(), h)
    with pytest.raises(TypeError, match="highway_gate: h must be float32"):
        convkernels.ops.highway_gate(h.int(), h.int(), h.int())
    with pytest.raises(ValueError, match="highway_gate: x is on meta but h is on cpu"):
        convkernels.ops.highway_gate(h, h, h.to("meta"))
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'x'"):
        convkernels.ops.highway_gate(h, h, 1.0)


def test_inference_mode_and_compile():
    h, gate, x = _inputs((2, 3, 4, 5), torch.float32, "cpu", "nchw")
    with torch.inference_mode():
        torch.testing.assert_close(convkernels.ops.highway_gate(h, gate, x), _eager(h, gate, x))
    compiled = torch.compile(convkernels.ops.highway_gate, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(h, gate, x), _eager(h, gate, x))
    # Inference skips the custom op's layers eagerly; a trace still records the op.
    from torch.fx.experimental.proxy_tensor import make_fx
    with torch.no_grad():
        gm = make_fx(convkernels.ops.highway_gate)(h, gate, x)
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert called == ["convkernels.highway_gate_forward.default"], called


# ------------------------------------------------------------- the highway layers


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def gate_calls(monkeypatch):
    """How many times the layers ran the op."""
    calls = []
    real = convkernels.ops.highway_gate
    monkeypatch.setattr(convkernels.ops, "highway_gate", lambda *a: calls.append(1) or real(*a))
    return calls


def _models(dtype=torch.float32):
    torch.manual_seed(0)
    model = convkernels.models.highway_net(width=8, depth=3).to(dtype)
    return model, convkernels.unoptimize(copy.deepcopy(model))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_highway_net_runs_the_op(mode, gate_calls):
    model, plain = _models()
    model.train(mode == "train"), plain.train(mode == "train")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = model(x)
    assert len(gate_calls) == 3
    assert _rel(y, plain(x)) <= 1e-4
    for name, buf in plain.named_buffers():  # the same running statistics
        torch.testing.assert_close(dict(model.named_buffers())[name], buf)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_highway_net_float64_gradients(mode, gate_calls):
    model, plain = _models(torch.float64)
    model.train(mode == "train"), plain.train(mode == "train")
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    model(xs[0]).square().sum().backward()
    plain(xs[1]).square().sum().backward()
    assert len(gate_calls) == 3
    assert _rel(xs[0].grad, xs[1].grad) <= 1e-6
    theirs = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert _rel(p.grad, theirs[name].grad) <= 1e-6, name


def test_hook_on_gate_act_runs_that_layer_unfused(gate_calls):
    model, plain = _models()
    model.eval(), plain.eval()
    seen = []
    model.layers[1].gate_act.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = model(x)
    assert len(seen) == 1 and len(gate_calls) == 2  # the other two layers stay fused
    t = plain.layers[1].gate_act(plain.layers[1].gate(plain.layers[0](plain.stem(x))))
    torch.testing.assert_close(seen[0], t)
    assert _rel(y, plain(x)) <= 1e-4


def test_hook_return_value_is_used(gate_calls):
    model, plain = _models()
    model.eval(), plain.eval()
    for m in (model, plain):
        m.layers[0].gate_act.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert _rel(model(x), plain(x)) <= 1e-4


def test_replaced_gate_act_runs_unfused(gate_calls):
    model, plain = _models()
    model.eval(), plain.eval()
    for m in (model, plain):
        m.layers[2].gate_act = torch.nn.Hardsigmoid()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert _rel(model(x), plain(x)) <= 1e-4
    assert len(gate_calls) == 2
    reasons = {p.covers: p for p in convkernels.explain(model) if p.op == "highway_gate"}
    assert not reasons[("layers.2.gate_act",)].fused
    assert "Hardsigmoid, not Sigmoid" in reasons[("layers.2.gate_act",)].reason


def test_explain_lists_the_gate_parts():
    model, _ = _models()
    parts = [p for p in convkernels.explain(model) if p.op == "highway_gate"]
    assert [p.covers for p in parts] == [(f"layers.{i}.gate_act",) for i in range(3)]
    assert all(p.fused and p.family == "highway.HighwayLayer" for p in parts)
    model.layers[0].gate_act.register_forward_pre_hook(lambda m, i: None)
    first = next(p for p in convkernels.explain(model) if p.op == "highway_gate")
    assert not first.fused and first.reason == "layers.0.gate_act has a forward pre-hook"


def test_mixed_dtypes_fall_back_to_the_formula(gate_calls):
    """The formula promotes an fp32 input with a bf16 transform; the op takes one dtype."""
    model, _ = _models()
    layer = model.layers[0].eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        want = convkernels.unoptimize(copy.deepcopy(layer))(x)
    assert y.dtype == want.dtype == torch.float32 and not gate_calls
    assert _rel(y.float(), want.float()) <= 1e-2


def test_highway_net_compiles_without_graph_breaks(gate_calls):
    model, plain = _models()
    model.eval(), plain.eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        assert _rel(y, plain(x)) <= 1e-4
    assert len(gate_calls) == 3  # traced once


def test_highway_net_under_bf16_autocast(gate_calls):
    model, plain = _models()
    model.eval(), plain.eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = model(x), plain(x)
    assert y.dtype == want.dtype and len(gate_calls) == 3
    assert _rel(y.float(), want.float()) <= 3e-2


def test_export_gets_the_layers_own_graph():
    model, plain = _models()
    model.eval()
    ep = torch.export.export(model, (torch.randn(2, 1, 28, 28),))
    assert not any("convkernels" in str(n.target) for n in ep.graph.nodes)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert _rel(ep.module()(x), plain.eval()(x)) <= 1e-5
