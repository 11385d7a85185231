"""ConvBNAct2d / BNActConv2d: usual state-dict keys, torch semantics, and an
eval weight cache that is never stale."""
import pytest
import torch
from torch import nn

import convkernels
from convkernels.nn import BNActConv2d, ConvBNAct2d
from convkernels.ops import _fold

from harness import TARGET_IDS, TARGETS, assert_close, make, on, randomise_state


class _EagerConvBNAct(nn.Module):
    def __init__(self, *args, act="relu", **kw):
        super().__init__()
        self.conv = nn.Conv2d(*args, bias=False, **kw)
        self.bn = nn.BatchNorm2d(args[1])
        self.act = nn.SiLU() if act == "silu" else nn.ReLU()

    def forward(self, x, residual=None):
        z = self.bn(self.conv(x))
        return self.act(z if residual is None else z + residual)


def test_state_dict_keys():
    m = ConvBNAct2d(4, 8, 3, padding=1)
    assert list(m.state_dict()) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                    "bn.running_var", "bn.num_batches_tracked"]
    p = BNActConv2d(4, 8, 1)
    assert list(p.state_dict()) == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                    "bn.num_batches_tracked", "conv.weight"]
    assert isinstance(m.conv, nn.Conv2d) and isinstance(m.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_conv_bn_act_module_trains_like_eager(target):
    ours = ConvBNAct2d(4, 6, 3, stride=2, padding=1, act="silu").to(target.device)
    eager = _EagerConvBNAct(4, 6, 3, stride=2, padding=1, act="silu").to(target.device)
    randomise_state(eager)
    ours.load_state_dict(eager.state_dict(), strict=True)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    for step in range(3):
        x = make((3, 4, 9, 9), torch.float32, target.device, seed=step)
        r = make((3, 6, 5, 5), torch.float32, target.device, seed=10 + step)
        with on(target):
            y = ours(x, residual=r)
            y.square().sum().backward()
        eager(x, residual=r).square().sum().backward()
        opt_o.step(), opt_e.step(), opt_o.zero_grad(), opt_e.zero_grad()
    for (name, a), b in zip(ours.state_dict().items(), eager.state_dict().values()):
        if a.is_floating_point():
            assert_close(a, b.double(), torch.float32, "grad", name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fold_cache_refreshes(target, layout):
    """The folded eval weights (and on CPU, channels_last, their prepacked
    oneDNN copy) follow optimizer.step() and load_state_dict()."""
    torch.manual_seed(0)
    ours = ConvBNAct2d(4, 6, 3, padding=1).to(target.device)
    eager = _EagerConvBNAct(4, 6, 3, padding=1).to(target.device)
    randomise_state(eager)
    ours.load_state_dict(eager.state_dict())
    x = make((2, 4, 6, 6), torch.float32, target.device, layout, seed=1)

    def check(msg):
        ours.eval(), eager.eval()
        with on(target), torch.no_grad():
            y = ours(x)
        assert_close(y, eager(x).detach().double(), torch.float32, "grad", msg)

    _fold.FOLD_CACHE.clear()
    check("first eval")
    check("cached eval")
    # A training step changes weights and running stats in place.
    ours.train(), eager.train()
    opt = torch.optim.SGD(list(ours.parameters()) + list(eager.parameters()), lr=0.5)
    with on(target):
        ours(x).sum().backward()
    eager(x).sum().backward()
    opt.step()
    check("after optimizer.step")
    # New weights loaded in place.
    randomise_state(eager)
    eager.bn.running_var.mul_(3)
    ours.load_state_dict(eager.state_dict())
    check("after load_state_dict")
    # The parameters themselves are never overwritten by folding.
    assert torch.equal(ours.conv.weight, eager.conv.weight)


def test_fold_cache_drops_what_a_refresh_leaves_behind():
    """A refresh makes a new folded weight (on CPU, channels_last, with a new
    prepacked copy of it): the copy of the old one leaves the cache with it."""
    ours = ConvBNAct2d(4, 6, 3, padding=1).eval()
    x = make((2, 4, 6, 6), torch.float32, "cpu", "channels_last", seed=1)
    _fold.FOLD_CACHE.clear()
    with convkernels.use_backend("cpu"), torch.no_grad():
        ours(x)
        entries = len(_fold.FOLD_CACHE)
        for _ in range(4):
            ours.conv.weight.mul_(0.9)
            ours(x)
    assert entries == 2  # the folded (weight, bias) and the prepacked weight
    assert len(_fold.FOLD_CACHE) == entries


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_bn_act_conv_module_matches_eager(target):
    ours = BNActConv2d(6, 4, 3, padding=1).to(target.device)
    bn, conv = nn.BatchNorm2d(6).to(target.device), nn.Conv2d(6, 4, 3, padding=1, bias=False).to(target.device)
    eager = nn.Sequential(bn, nn.ReLU(), conv)
    randomise_state(eager)
    ours.bn.load_state_dict(bn.state_dict())
    ours.conv.load_state_dict(conv.state_dict())
    for mode in (True, False):
        ours.train(mode), eager.train(mode)
        x = make((2, 6, 7, 7), torch.float32, target.device, seed=int(mode))
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with on(target):
            y = ours(x1)
            y.sum().backward()
        y_e = eager(x2)
        y_e.sum().backward()
        assert_close(y, y_e.detach().double(), torch.float32, "grad", f"out train={mode}")
        assert_close(x1.grad, x2.grad.double(), torch.float32, "grad", f"grad x train={mode}")
    assert_close(ours.bn.running_var, bn.running_var.double(), torch.float32, "grad", "running_var")
    assert torch.equal(ours.bn.num_batches_tracked, bn.num_batches_tracked)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_bn_act_conv_eval_follows_the_conv_weight(target):
    """Inference reuses a derived copy of the conv weight (on CPU, prepacked
    for oneDNN): it follows an optimizer step and a load_state_dict."""
    ours = BNActConv2d(6, 4, 3, padding=1).to(target.device)
    bn, conv = nn.BatchNorm2d(6).to(target.device), nn.Conv2d(6, 4, 3, padding=1, bias=False).to(target.device)
    eager = nn.Sequential(bn, nn.ReLU(), conv).eval()
    randomise_state(eager)
    ours.bn.load_state_dict(bn.state_dict())
    ours.conv.load_state_dict(conv.state_dict())
    ours.eval()
    x = make((2, 6, 7, 7), torch.float32, target.device, "channels_last", seed=3)

    def check(msg):
        with on(target), torch.no_grad():
            y = ours(x)
        assert_close(y, eager(x).detach().double(), torch.float32, "grad", msg)

    check("first eval")
    check("cached eval")
    opt = torch.optim.SGD(list(ours.parameters()) + list(eager.parameters()), lr=0.5)
    with on(target):
        ours(x).square().sum().backward()
    eager(x).square().sum().backward()
    opt.step()
    check("after optimizer.step")
    randomise_state(eager)
    ours.load_state_dict({"bn." + k: v for k, v in bn.state_dict().items()}
                         | {"conv." + k: v for k, v in conv.state_dict().items()})
    check("after load_state_dict")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(target, training):
    """ConvBNAct2d and BNActConv2d compile with no graph break, forward and
    backward, and match eager."""
    def build():
        torch.manual_seed(0)
        return nn.ModuleDict({"a": ConvBNAct2d(4, 6, 3, padding=1),
                              "b": BNActConv2d(6, 4, 1)}).to(target.device).train(training)

    def forward(m, x):
        return m["b"](m["a"](x, residual=None)) + x

    eager, twin = build(), build()
    x = make((2, 4, 6, 6), torch.float32, target.device, seed=5)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with on(target):
        torch._dynamo.reset()
        y_c = torch.compile(lambda v: forward(twin, v), fullgraph=True, dynamic=False)(xs[0])
        y_c.sum().backward()
        y_e = forward(eager, xs[1])
        y_e.sum().backward()
    assert_close(y_c, y_e.detach().double(), torch.float32, "grad", "compiled out")
    assert_close(xs[0].grad, xs[1].grad.double(), torch.float32, "grad", "compiled grad x")
    for (name, a), b in zip(twin.named_parameters(), eager.parameters()):
        assert_close(a.grad, b.grad.double(), torch.float32, "grad", name)
    for (name, a), b in zip(twin.named_buffers(), eager.buffers()):
        if a.is_floating_point():
            assert_close(a, b.double(), torch.float32, "grad", name)
        else:
            assert torch.equal(a, b), name
