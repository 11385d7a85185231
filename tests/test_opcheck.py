"""torch.library.opcheck on every convkernels op, on every native backend here."""
import pytest
import torch
from torch.library import opcheck

import convkernels  # noqa: F401

from harness import TARGET_IDS, TARGETS, make, on, vector

ops = torch.ops.convkernels


def _bn_samples(device, c=3):
    x = make((2, c, 4, 5), torch.float32, device, seed=1).requires_grad_(True)
    r = make((2, c, 4, 5), torch.float32, device, seed=2).requires_grad_(True)
    w = vector(c, torch.float32, device, 3).requires_grad_(True)
    b = vector(c, torch.float32, device, 4).requires_grad_(True)
    rm, rv = vector(c, torch.float32, device, 5), vector(c, torch.float32, device, 6)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    return x, r, w, b, rm, rv, xcl


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_bn_act_ops(target):
    impl = target.backend
    x, r, w, b, rm, rv, xcl = _bn_samples(target.device)
    with on(target):
        for training in (True, False):
            opcheck(ops.bn_act, (x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, "relu", r))
            opcheck(ops.bn_act, (xcl, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-5, "silu", None))
            opcheck(ops.bn_act_forward, (x, w, b, r, rm, rv, training, 1e-5, "sigmoid", impl))
            mean, var = rm + 0.1, rv + 0.2
            g = torch.randn_like(x)
            opcheck(ops.bn_act_backward, (g, x.detach(), w.detach(), b.detach(), r.detach(), mean, var,
                                          training, 1e-5, "relu", [True, True, True, True], impl))
            opcheck(ops.bn_act_backward, (g, x.detach(), None, None, None, mean, var,
                                          training, 1e-5, "identity", [True, False, False, False], impl))
        opcheck(ops.update_running_stats, (rm.clone(), rv.clone(), rm + 1, rv + 1, 0.1, 40))
        opcheck(ops.batch_stats, (x, impl))
        opcheck(ops.batch_stats_backward, (rm, rv, x.detach(), rm + 0.5, impl))


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_add_act_ops(target):
    impl = target.backend
    x, r, *_ = _bn_samples(target.device)
    scale = torch.tensor([0.0, 1.25], device=target.device)
    g = torch.randn_like(x)
    with on(target):
        opcheck(ops.add_act, (x, r, "relu", scale))
        opcheck(ops.add_act, (x, r, "silu", None))
        opcheck(ops.add_act_forward, (x, r, "sigmoid", scale, impl))
        opcheck(ops.add_act_backward, (g, x.detach(), r.detach(), "relu", scale, [True, True], impl))
        opcheck(ops.add_act_backward, (g, x.detach(), r.detach(), "relu", None, [False, True], impl))


def _conv_samples(device, cin=4, cout=6):
    x = make((2, cin, 5, 5), torch.float32, device, seed=1).requires_grad_(True)
    cw = (make((cout, cin, 3, 3), torch.float32, device, seed=2) / 6).requires_grad_(True)
    cb = vector(cout, torch.float32, device, 3).requires_grad_(True)
    return x, cw, cb


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_conv_bn_act_ops(target):
    impl = target.backend
    x, cw, cb = _conv_samples(target.device)
    _, r, w, b, rm, rv, _ = _bn_samples(target.device, 6)
    r = make((2, 6, 5, 5), torch.float32, target.device, seed=9).requires_grad_(True)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    out = torch.empty(2, 8, 5, 5, device=target.device)[:, 1:7]
    with on(target):
        for training in (True, False):
            args = (x, cw, cb, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, *conv, "relu", r)
            opcheck(ops.conv_bn_act.default, args)
            with torch.no_grad():
                opcheck(ops.conv_bn_act.out, args, {"out": out})
            opcheck(ops.conv_bn_act_forward,
                    (x, cw, cb, w, b, rm, rv, training, 1e-5, *conv, "silu", r, impl))
        with torch.no_grad():
            opcheck(ops.conv_bn_act_eval, (x.detach(), cw.detach(), cb.detach(), rm, rv, w.detach(),
                                           b.detach(), 1e-5, *conv, "relu", None, impl))
            opcheck(ops.conv_bn_act_eval_out, (x.detach(), cw.detach(), None, rm, rv, None, None,
                                               1e-5, *conv, "identity", r.detach(), impl, out))
        g = torch.randn(2, 6, 5, 5, device=target.device)
        z = torch.randn(2, 6, 5, 5, device=target.device)
        opcheck(ops.conv_bn_act_backward, (g, x.detach(), cw.detach(), z, w.detach(), b.detach(),
                                           r.detach(), rm, rv + 0.5, True, 1e-5, *conv, "relu", True,
                                           [True] * 6, impl))


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_bn_act_conv_ops(target):
    impl = target.backend
    x, cw, cb = _conv_samples(target.device)
    _, _, w, b, rm, rv, _ = _bn_samples(target.device, 4)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    out = torch.empty(2, 9, 5, 5, device=target.device)[:, 3:]
    mean, var = rm.clone().requires_grad_(True), (rv + 0.5).requires_grad_(True)
    with on(target):
        for training in (True, False):
            args = (x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, "relu", cw, cb, *conv)
            opcheck(ops.bn_act_conv.default, args)
            with torch.no_grad():
                opcheck(ops.bn_act_conv.out, args, {"out": out})
        opcheck(ops.bn_act_conv.default, (x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, "silu", cw, cb,
                                  *conv, mean, var))
        opcheck(ops.bn_act_conv_forward, (x, mean, var, w, b, 1e-5, "relu", cw, cb, *conv, impl))
        m, v = ops.batch_stats(x.detach(), impl)  # x's own statistics, folded in backward
        opcheck(ops.bn_act_conv_forward, (x, m, v, w, b, 1e-5, "relu", cw, cb, *conv, impl, True))
        with torch.no_grad():
            opcheck(ops.bn_act_conv_out, (x.detach(), rm, rv, w.detach(), None, 1e-5, "sigmoid",
                                          cw.detach(), None, *conv, impl, out))
        g = torch.randn(2, 6, 5, 5, device=target.device)
        opcheck(ops.bn_act_conv_backward, (g, x.detach(), rm, rv + 0.5, w.detach(), b.detach(), 1e-5,
                                           "relu", cw.detach(), *conv, True, False, [True] * 7, impl))
        opcheck(ops.bn_act_conv_backward, (g, x.detach(), rm, rv + 0.5, w.detach(), b.detach(), 1e-5,
                                           "relu", cw.detach(), *conv, True, True,
                                           [True, False, False] + [True] * 4, impl))



@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_tracing_records_the_ops(target):
    """Eager calls on plain tensors skip the dispatcher (ops._library.plain_eager);
    a trace must still record the convkernels ops, not the aten ops they run."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, cw, _ = _conv_samples(target.device)
    _, _, w, b, rm, rv, _ = _bn_samples(target.device, 6)
    cw2 = make((4, 6, 3, 3), torch.float32, target.device, seed=5) / 7
    x, w, b = (t.detach() for t in (x, w, b))
    cw = torch.nn.Parameter(cw.detach())  # as in a module: counts as a plain tensor

    def eval_convs(x):
        y = convkernels.ops.conv_bn_act(x, cw, None, rm, rv, w, b, False, padding=1)
        return convkernels.ops.bn_act_conv(y, rm, rv, w, b, False, conv_weight=cw2, padding=1)

    with on(target), torch.no_grad():
        gm = make_fx(eval_convs)(x)
        called = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert any(c.startswith("convkernels.conv_bn_act") for c in called), called
        assert any(c.startswith("convkernels.bn_act_conv") for c in called), called
        assert not any("convolution" in c for c in called), called
        torch.testing.assert_close(gm(x), eval_convs(x))


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_direct_ops_first_looked_up_under_compile(target):
    """DirectOps resolves an op on its first use; when that first use is inside
    torch.compile(fullgraph=True) the trace must still get the op (the lookup
    itself is not traceable), and later eager calls the direct body."""
    from convkernels.ops._library import DirectOps

    x, _, w, b, rm, rv, _ = _bn_samples(target.device)
    direct = DirectOps()  # nothing looked up yet

    def eval_bn(x):
        return direct.bn_act_forward(x, w, b, None, rm, rv, False, 1e-5, "relu", target.backend)[0]

    with on(target), torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(eval_bn, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(compiled, eval_bn(x))
        torch.testing.assert_close(compiled, torch.relu(torch.nn.functional.batch_norm(
            x, rm, rv, w, b, False, 0.0, 1e-5)))


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_conv_act_ops(target):
    impl = target.backend
    x, cw, cb = _conv_samples(target.device)
    r = make((2, 6, 5, 5), torch.float32, target.device, seed=9).requires_grad_(True)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    out = torch.empty(2, 8, 5, 5, device=target.device)[:, 1:7]
    with on(target):
        for act in ("relu", "silu"):
            args = (x, cw, cb, *conv, act, r)
            opcheck(ops.conv_act.default, args)
            with torch.no_grad():
                opcheck(ops.conv_act.out, args, {"out": out})
            opcheck(ops.conv_act_forward, (x, cw, cb, *conv, act, r, impl))
        opcheck(ops.conv_act_forward, (x, cw, None, *conv, "identity", None, impl))
        with torch.no_grad():
            opcheck(ops.conv_act_eval, (x.detach(), cw.detach(), cb.detach(), *conv, "relu", None,
                                        impl))
            opcheck(ops.conv_act_eval_out, (x.detach(), cw.detach(), None, *conv, "sigmoid",
                                            r.detach(), impl, out))
        g = torch.randn(2, 6, 5, 5, device=target.device)
        t = torch.randn(2, 6, 5, 5, device=target.device)
        xd, cwd = x.detach(), cw.detach()
        opcheck(ops.conv_act_backward, (g, xd, cwd, t, None, None, *conv, "relu", True,
                                        [True] * 4, impl))
        opcheck(ops.conv_act_backward, (g, xd, cwd, t, cb.detach(), r.detach(), *conv, "silu",
                                        True, [True, False, True, True], impl))
        opcheck(ops.conv_act_backward, (g, xd, cwd, None, None, None, *conv, "identity", False,
                                        [True, True, False, False], impl))


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_highway_gate_ops(target):
    impl = target.backend
    h, gate, *_ = _bn_samples(target.device)
    x = make((2, 3, 4, 5), torch.float32, target.device, seed=7).requires_grad_(True)
    g = torch.randn_like(h)
    with on(target):
        opcheck(ops.highway_gate, (h, gate, x))
        opcheck(ops.highway_gate_forward, (h, gate, x, impl))
        opcheck(ops.highway_gate_backward, (g, h.detach(), gate.detach(), x.detach(),
                                            [True, True, True], impl))
        opcheck(ops.highway_gate_backward, (g, h.detach(), gate.detach(), x.detach(),
                                            [False, True, False], impl))
