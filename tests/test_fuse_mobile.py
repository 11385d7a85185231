"""fuse.mobile and fuse.timm: torchvision's EfficientNet, RegNet and MobileNet
blocks and timm's BatchNormAct2d / ResNet blocks, optimized, against an
unoptimized copy with the same (BN-randomised) weights and inputs.

Stochastic depth and dropout draw from the global RNG, so each forward runs
after the same ``torch.manual_seed``: the fused join draws torchvision's mask.
Op counters prove the fused path ran the parts it should.
"""
import copy
import inspect

import pytest
import torch
import torchvision
from torch import nn

import convkernels
from convkernels import explain, ops, optimize, unoptimize
from convkernels.fuse import mobile
from convkernels.fuse._bind import bound
from model_checks import (assert_grads_and_buffers_match, gets_channels_last,  # noqa: F401
                          one_thread, randomise_bn, rel)

SIZE = 64  # the last stage of every model here stays 2x2

TV = ["efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "regnet_x_400mf",
      "mobilenet_v2", "mobilenet_v3_small"]
TIMM = ["timm_resnet50", "timm_efficientnet_b0"]


def build(name: str) -> nn.Module:
    if name.startswith("timm_"):
        timm = pytest.importorskip("timm")
        return timm.create_model(name[len("timm_"):])
    return getattr(torchvision.models, name)()


_BASE = {}


def pair(name: str, dtype=torch.float32):
    """(reference, optimized): the same weights, the optimized one a deep copy."""
    if name not in _BASE:
        torch.manual_seed(0)
        _BASE[name] = randomise_bn(build(name))
    ref = copy.deepcopy(_BASE[name]).to(dtype)
    return ref, optimize(ref)


def inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, SIZE, SIZE, generator=g, dtype=dtype)


def seeded(model, x):
    torch.manual_seed(3)  # stochastic depth and dropout masks
    return model(x)


def train_step(model, x, seed=2):
    model.train()
    x = x.clone().requires_grad_()
    y = seeded(model, x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    return y, x.grad


# ------------------------------------------------------------ expected parts
def _is(m, name: str) -> bool:
    return type(m).__name__ == name


def _conv_bn_pairs(model: nn.Module) -> int:
    """Every Conv2d a BatchNorm2d follows among its siblings: each is one
    conv_bn_act per forward (timm's ResNet stem aside: timm's forward_features
    computes it, which nothing binds)."""
    n = 0
    for parent in model.modules():
        if _is(parent, "ResNet") and type(parent).__module__.startswith("timm"):
            continue
        kids = list(parent.children())
        n += sum(type(a) is nn.Conv2d and type(b) is nn.BatchNorm2d for a, b in zip(kids, kids[1:]))
    return n


def _drop_joins(model: nn.Module) -> int:
    """MBConv / FusedMBConv joins that draw a stochastic-depth mask in training."""
    return sum(_is(m, n) and m.use_res_connect and m.stochastic_depth.p > 0
               and len(m.block) > 1 for n in ("MBConv", "FusedMBConv") for m in model.modules())


def expected(model: nn.Module, training: bool) -> dict:
    return {"conv_bn_act": _conv_bn_pairs(model),
            "bn_act": sum(_is(m, "BatchNormAct2d") for m in model.modules()),
            "add_act": _drop_joins(model) if training else 0}


@pytest.fixture
def calls(monkeypatch):
    counts = {"conv_bn_act": 0, "bn_act": 0, "add_act": 0}
    for name in list(counts):
        op = getattr(ops, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    return counts


def reset(calls):
    for k in calls:
        calls[k] = 0


def test_every_model_fuses_something():
    """The counts the other tests expect are not vacuous."""
    for name in TV + TIMM:
        if name.startswith("timm_"):
            pytest.importorskip("timm")
        ref, _ = pair(name)
        want = expected(ref, training=True)
        assert want["conv_bn_act"] + want["bn_act"] > 10, name
    assert expected(pair("efficientnet_b0")[0], True)["add_act"] > 0


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize("name", TV + TIMM)
def test_fp32_outputs_match(name, calls):
    ref, opt = pair(name)
    x = inputs()
    ref.eval(), opt.eval()
    with torch.no_grad():
        assert rel(opt(x), ref(x)) < 1e-4
    assert calls == expected(opt, training=False)  # the folded inference path
    reset(calls)
    assert rel(opt(x), ref(x)) < 1e-4  # eval with autograd
    assert calls == expected(opt, training=False)
    reset(calls)
    ref.train(), opt.train()
    assert rel(seeded(opt, x), seeded(ref, x)) < 1e-4
    assert calls == expected(opt, training=True)


@pytest.mark.parametrize("name", [n for n in TV + TIMM if n != "efficientnet_v2_s"])
def test_float64_train_step_grads_and_running_stats(name, calls):
    ref, opt = pair(name, torch.float64)
    x = inputs(torch.float64)
    with convkernels.use_backend("cpu"):
        y_ref, gx_ref = train_step(ref, x)
        y_opt, gx_opt = train_step(opt, x)
    assert calls == expected(opt, training=True)
    assert rel(y_opt, y_ref) < 1e-6
    assert rel(gx_opt, gx_ref) < 1e-6
    assert_grads_and_buffers_match(opt, ref)


def test_stochastic_depth_drops_as_torchvision(calls):
    """p = 0.5 on every residual block of efficientnet_b0: some rows dropped
    (the scaled add is observable), and still torchvision's masks."""
    ref, opt = pair("efficientnet_b0", torch.float64)
    for model in (ref, opt):
        for m in model.modules():
            if _is(m, "StochasticDepth"):
                m.p = 0.5
    x = inputs(torch.float64)
    y_ref, gx_ref = train_step(ref, x)
    y_opt, gx_opt = train_step(opt, x)
    assert calls["add_act"] == expected(opt, training=True)["add_act"]
    assert rel(y_opt, y_ref) < 1e-6 and rel(gx_opt, gx_ref) < 1e-6
    torch.manual_seed(3)
    ref.train()(x)
    other = ref(x)  # the next masks: the output depends on them
    assert rel(other, y_ref) > 1e-3


# ------------------------------------------------------------------ hooks
HOOKS = {  # model -> (hooked modules, fused parts they send back to the modules)
    "efficientnet_b0": (["features.2.1.block.0.0", "features.2.1.block.2"], 1),
    "efficientnet_b0_project": (["features.3.1.block.3.0"], 1),
    "regnet_y_400mf": (["trunk_output.block2.block2-1.f.b.0", "trunk_output.block2.block2-1.f.se"], 1),
    "regnet_y_400mf_join": (["trunk_output.block3.block3-1.f.c.0"], 1),
    "timm_efficientnet_b0": (["blocks.2.1.bn2.act", "blocks.2.1.se"], 1),
}


@pytest.mark.parametrize("case", list(HOOKS))
def test_hooks_fire_with_the_same_tensors(case, calls):
    """A forward hook that records its output and returns it doubled, on an
    inner conv (timm: the act inside a BatchNormAct2d) of a block and on its SE
    module."""
    name = case.replace("_project", "").replace("_join", "")
    targets, unfused = HOOKS[case]
    ref, opt = pair(name, torch.float64)
    records = {"ref": [], "opt": []}
    for key, model in (("ref", ref), ("opt", opt)):
        for t in targets:
            model.get_submodule(t).register_forward_hook(
                lambda m, a, out, r=records[key]: (r.append(out.detach().clone()), out * 2)[1])
    x = inputs(torch.float64)
    with convkernels.use_backend("cpu"):
        y_ref, gx_ref = train_step(ref, x)
        y_opt, gx_opt = train_step(opt, x)
    want = expected(opt, training=True)
    fused_bn = "bn_act" if name.startswith("timm_") else "conv_bn_act"
    want[fused_bn] -= unfused
    if case == "efficientnet_b0_project":
        want["add_act"] -= 1  # torchvision's forward: StochasticDepth as a module
    assert calls == want
    assert len(records["opt"]) == len(records["ref"]) == len(targets)
    assert all(rel(a, b) < 1e-6 for a, b in zip(records["opt"], records["ref"]))
    assert rel(y_opt, y_ref) < 1e-6 and rel(gx_opt, gx_ref) < 1e-6
    for (n, p), q in zip(opt.named_parameters(), ref.parameters()):
        assert rel(p.grad, q.grad) < 1e-6, n


def test_observed_block_container_runs_torchvision_forward(calls):
    """A hook on MBConv's ``block`` Sequential: the block cannot run its
    children itself, so it runs torchvision's forward (children still fused)."""
    ref, opt = pair("efficientnet_b0")
    seen = {}
    for key, model in (("ref", ref), ("opt", opt)):
        model.features[2][1].block.register_forward_hook(
            lambda m, a, out, k=key: seen.setdefault(k, out.detach().clone()))
    ref.eval(), opt.eval()
    x = inputs()
    with torch.no_grad():
        assert rel(opt(x), ref(x)) < 1e-4
    assert rel(seen["opt"], seen["ref"]) < 1e-4
    assert calls == expected(opt, training=False)  # the project fused without residual


# ------------------------------------------------------------------ report
SE_CONVS = ("fc1", "fc2", "conv_reduce", "conv_expand")


@pytest.mark.parametrize("name", TV + TIMM)
def test_explain_lists_the_parts(name):
    ref, _ = pair(name)
    opt, report = optimize(ref, report=True)
    covered = {n for p in report for n in p.covers if p.op != "-"}
    for n, m in opt.named_modules():
        if isinstance(m, nn.BatchNorm2d) and not (name == "timm_resnet50" and n == "bn1"):
            assert n in covered, n
    # Left: SE's convs (no BN to fuse), timm's ResNet stem, and timm's convs
    # before a BatchNormAct2d (its bn_act is fused, the conv runs as aten);
    for p in report.left:
        if p.op == "-":
            m = opt.get_submodule(p.covers[0])
            assert (p.covers[0].endswith(SE_CONVS) or p.covers[0] in ("conv1", "bn1")
                    or (name == "timm_efficientnet_b0" and _is(m, "Conv2d"))), p
    joins = [p for p in report if "residual" in p.op]
    blocks = [m for m in opt.modules() if _is(m, "ResBottleneckBlock")
              or (_is(m, "MBConv") and m.use_res_connect)]
    assert len(joins) >= len(blocks)
    if name == "regnet_y_400mf":
        b = "trunk_output.block1.block1-0."
        assert (b + "f.c.0", b + "f.c.1", b + "activation") in [p.covers for p in joins]
    assert str(report).startswith(f"{len(report.fused)} fused parts")


@pytest.mark.parametrize("name", TV + ["timm_resnet50"])
def test_explain_reports_fused(name):
    ref, _ = pair(name)
    report = explain(optimize(ref))
    assert all(p.fused for p in report if p.op != "-"), [p for p in report.left if p.op != "-"]


def test_explain_reports_batchnormact_fused():
    pytest.importorskip("timm")
    ref, _ = pair("timm_efficientnet_b0")
    report = explain(optimize(ref))
    assert all(p.fused for p in report if p.op.startswith("bn_act"))
    assert not [p for p in report.left if p.op == "-" and p.covers[0].endswith("bn1")]


# ------------------------------------------------------------------ builders
BUILDERS = convkernels.models.efficientnet.__all__ + convkernels.models.regnet.__all__
SMALL = ["efficientnet_b0", "regnet_x_400mf"]
LARGE = ["efficientnet_b7", "efficientnet_v2_l", "regnet_x_32gf", "regnet_y_32gf"]


def test_builders_are_every_torchvision_one():
    tv = {n for n in dir(torchvision.models) if n.startswith(("efficientnet_", "regnet_"))
          and callable(getattr(torchvision.models, n))}
    assert set(BUILDERS) == tv


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_signature_is_torchvision(name):
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    assert params(getattr(convkernels.models, name)) == params(getattr(torchvision.models, name))


@pytest.mark.parametrize("name", SMALL)
def test_builder_is_torchvision_plus_optimize(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(num_classes=7)
    torch.manual_seed(0)
    ours = getattr(convkernels.models, name)(num_classes=7)
    assert type(ours) is type(theirs)
    sd, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd) == list(sd_theirs) and all(torch.equal(sd[k], sd_theirs[k]) for k in sd)
    assert explain(ours).fused and not any("forward" in m.__dict__ for m in theirs.modules())


@pytest.mark.parametrize("name", LARGE)
def test_large_builder_binds_and_matches(name, calls):
    """The largest variants: optimize binds every block and a 1-sample eval
    matches the same model unoptimized."""
    torch.manual_seed(0)
    opt = getattr(convkernels.models, name)().eval()
    x = inputs()[:1]
    with torch.no_grad():
        y = opt(x)
        assert calls["conv_bn_act"] == expected(opt, training=False)["conv_bn_act"]
        assert rel(y, unoptimize(opt)(x)) < 1e-4


# ------------------------------------------------------------------ layout
# Top level -> (its bound forward, its stem, the first module after the stem).
TOPS = {"efficientnet_b0": (mobile.efficientnet_forward, "features.0", "features.1"),
        "regnet_y_400mf": (mobile.regnet_forward, "stem", "trunk_output")}


@pytest.mark.parametrize("name", list(TOPS))
def test_top_level_runs_the_trunk_channels_last_on_cpu(name):
    """The fused stem makes the trunk channels_last, fp32 and float64 alike, so
    the numbers tests above (fp32 eval and train, float64 gradients and running
    stats) compare it against torchvision's NCHW model; not on the reference
    backend."""
    forward, stem, after = TOPS[name]
    ref, opt = pair(name)
    assert bound(opt).fn is forward
    top = [p for p in explain(opt) if p.module == ""]
    assert [(p.covers, p.fused) for p in top] == [((f"{stem}.0", f"{stem}.1", f"{stem}.2"), True)]
    for dtype in (torch.float32, torch.float64):
        x = inputs(dtype)
        assert gets_channels_last(opt.to(dtype), after, x)
        assert not gets_channels_last(ref.to(dtype), after, x)
    with convkernels.use_backend("reference"):
        assert not gets_channels_last(opt, after, x)


@pytest.mark.parametrize("name,hooked", [("efficientnet_b0", "features"),
                                         ("efficientnet_b0", "features.0"),
                                         ("efficientnet_b0", "features.0.0"),
                                         ("regnet_y_400mf", "stem"), ("regnet_y_400mf", "stem.1")])
def test_observed_stem_keeps_the_callers_layout(name, hooked):
    """A pre-hook on the stem, on one of its modules, or on ``features`` (the
    input passes it on its way to the stem) gets the tensor torchvision's gets,
    and the model runs its modules' own NCHW path: a float64 train step equal
    to torchvision's."""
    after = TOPS[name][2]
    ref, opt = pair(name, torch.float64)
    seen = {}

    def record(key):
        def hook(module, args):
            seen.setdefault(key, args[0].detach().clone())
        return hook

    for key, model in (("ref", ref), ("opt", opt)):
        model.get_submodule(hooked).register_forward_pre_hook(record(key))
    x = inputs(torch.float64)
    assert not gets_channels_last(opt, after, x)
    seen.clear()
    with convkernels.use_backend("cpu"):
        y_ref, gx_ref = train_step(ref, x)
        y_opt, gx_opt = train_step(opt, x)
    assert seen["opt"].stride() == seen["ref"].stride() and torch.equal(seen["opt"], seen["ref"])
    assert rel(y_opt, y_ref) < 1e-6 and rel(gx_opt, gx_ref) < 1e-6
    assert_grads_and_buffers_match(opt, ref)


@pytest.mark.parametrize("name", list(TOPS))
def test_fx_traces_torchvisions_graph_through_the_top_level(name):
    """Traced inside a wrapper, FX runs the bound top-level forward on proxies:
    torchvision's graph (no layout change), which computes torchvision's output."""
    ref, opt = pair(name)
    ref.eval(), opt.eval()  # stochastic depth's training flag is traced as a constant
    traced, theirs = (torch.fx.symbolic_trace(nn.Sequential(m)) for m in (opt, ref))
    assert [n.target for n in traced.graph.nodes] == [n.target for n in theirs.graph.nodes]
    x = inputs()
    with torch.no_grad():
        assert rel(traced(x), ref(x)) < 1e-4
