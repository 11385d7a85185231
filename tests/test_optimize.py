"""convkernels.optimize: fused forwards bound on existing models.

Every check compares the optimized model against an unoptimized copy with the
same weights and inputs (torchvision's own modules are the reference), and the
op counters prove the fused path really runs.
"""
import copy
import inspect
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import convkernels
from convkernels import explain, ops, optimize, unoptimize
from model_checks import (ConvkernelsOps, assert_grads_and_buffers_match,  # noqa: F401
                          one_thread, randomise_bn, rel)

SIZE = 40  # ResNet's last stage stays 2x2 (inputs of 33 to 64 do)


def user_cnn() -> nn.Module:
    """A user's plain CNN: every Sequential pattern, and things around them."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16),                    # act "identity"
        nn.BatchNorm2d(16, affine=False), nn.Sigmoid(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=None), nn.GELU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.BatchNorm2d(16), nn.Identity(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU()),
        nn.Conv2d(16, 8, 3),                                         # no BN: left alone
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


BUILDERS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50,
            "resnext50_32x4d": torchvision.models.resnext50_32x4d, "user_cnn": user_cnn}


_BASE = {}


def pair(name: str, dtype=torch.float32):
    """(reference, optimized): the same weights, the optimized one a deep copy."""
    if name not in _BASE:
        torch.manual_seed(0)
        _BASE[name] = randomise_bn(BUILDERS[name]())
    ref = copy.deepcopy(_BASE[name]).to(dtype)
    return ref, optimize(ref)


def inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, SIZE, SIZE, generator=g, dtype=dtype)


def fused_parts_expected(model: nn.Module) -> int:
    """Parts optimize must fuse: every Conv2d of these models that a
    BatchNorm2d follows, and every BN -> act run of the user CNN."""
    if isinstance(model, ResNet):
        return sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return 7


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused ops the fused forwards call."""
    counts = {"conv_bn_act": 0, "bn_act": 0}
    for name in counts:
        op = getattr(ops, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    counts["total"] = lambda: counts["conv_bn_act"] + counts["bn_act"]
    return counts


def reset(calls):
    calls["conv_bn_act"] = calls["bn_act"] = 0


def train_step(model, x, seed=2):
    """Forward + backward of a fixed random projection of the output."""
    model.train()
    x = x.clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    return y, x.grad


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize("name", list(BUILDERS))
def test_fp32_outputs_match(name, calls):
    ref, opt = pair(name)
    x = inputs()
    ref.eval(), opt.eval()
    with torch.no_grad():
        assert rel(opt(x), ref(x)) < 1e-4
    assert calls["total"]() == fused_parts_expected(opt)  # the folded inference path ran
    assert rel(opt(x), ref(x)) < 1e-4  # eval with autograd
    ref.train(), opt.train()
    assert rel(opt(x), ref(x)) < 1e-4


@pytest.mark.parametrize("name", list(BUILDERS))
def test_float64_train_step_grads_and_running_stats(name, calls):
    ref, opt = pair(name, torch.float64)
    x = inputs(torch.float64)
    with convkernels.use_backend("cpu"):
        y_ref, gx_ref = train_step(ref, x)
        y_opt, gx_opt = train_step(opt, x)
    assert calls["total"]() == fused_parts_expected(opt)
    assert rel(y_opt, y_ref) < 1e-6
    assert rel(gx_opt, gx_ref) < 1e-6
    assert_grads_and_buffers_match(opt, ref)


# ------------------------------------------------------------------ identity
@pytest.mark.parametrize("name", ["resnet18", "user_cnn"])
def test_identity_preserved(name):
    torch.manual_seed(0)
    model = randomise_bn(BUILDERS[name]())
    before = copy.deepcopy(model)
    params = [(n, id(p)) for n, p in model.named_parameters()]
    buffers = [(n, id(b)) for n, b in model.named_buffers()]
    names = [(n, type(m)) for n, m in model.named_modules()]
    assert optimize(model, inplace=True) is model
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert [(n, id(b)) for n, b in model.named_buffers()] == buffers
    assert [(n, type(m)) for n, m in model.named_modules()] == names
    sd, sd_before = model.state_dict(), before.state_dict()
    assert list(sd) == list(sd_before)
    assert all(torch.equal(sd[k], sd_before[k]) for k in sd)
    if name == "resnet18":
        assert isinstance(model, torchvision.models.ResNet) and type(model) is ResNet


def test_not_inplace_leaves_the_model_alone():
    ref, opt = pair("resnet18")
    assert opt is not ref
    assert not any("forward" in m.__dict__ for m in ref.modules())
    assert "forward" in opt.layer1[0].__dict__


def test_unoptimize_restores(calls):
    ref, opt = pair("resnet18")
    assert unoptimize(opt) is opt
    assert not any("forward" in m.__dict__ for m in opt.modules())
    assert not explain(opt).fused
    x = inputs()
    ref.eval(), opt.eval()
    with torch.no_grad():
        assert torch.equal(opt(x), ref(x))
    assert calls["total"]() == 0


def test_models_built_afterwards_are_untouched():
    class_forwards = {c: c.forward for c in (BasicBlock, Bottleneck, ResNet, nn.Sequential)}
    pair("resnet18")
    fresh = torchvision.models.resnet18()
    assert not any("forward" in m.__dict__ for m in fresh.modules())
    assert {c: c.forward for c in class_forwards} == class_forwards


@pytest.mark.parametrize("roundtrip", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_keep_the_fused_forwards(roundtrip, calls):
    ref, opt = pair("resnet18")
    copied = pickle.loads(pickle.dumps(opt)) if roundtrip == "pickle" else copy.deepcopy(opt)
    for m, n in zip(copied.modules(), opt.modules()):
        assert ("forward" in m.__dict__) == ("forward" in n.__dict__)
        if "forward" in m.__dict__:
            assert m.forward.module is m  # bound on the copy, not the original
    x = inputs()
    copied.eval(), ref.eval()
    with torch.no_grad():
        assert rel(copied(x), ref(x)) < 1e-4
    assert calls["total"]() == fused_parts_expected(opt)


def test_forward_signature_is_the_original():
    _, opt = pair("resnet18")
    assert inspect.signature(opt.layer1[0].forward) == inspect.signature(
        torchvision.models.resnet18().layer1[0].forward)


# ------------------------------------------------------------------ report
@pytest.mark.parametrize("name", list(BUILDERS))
def test_explain_lists_fused_parts(name):
    ref, _ = pair(name)
    opt, report = optimize(ref, report=True)
    assert len(report.fused) == fused_parts_expected(opt)
    covered = {n for p in report.fused for n in p.covers}
    for n, m in opt.named_modules():
        if type(m) is nn.BatchNorm2d:
            assert n in covered, n
    if isinstance(opt, ResNet):
        assert not report.left
        assert any(p.covers == ("layer2.0.downsample.0", "layer2.0.downsample.1")
                   and p.op == "conv_bn_act(act='identity')" for p in report.fused)
    else:  # the conv without BN, and the one before GELU is fused without it
        assert [p.covers for p in report.left] == [("18",)]
        assert ("10", "11") in [p.covers for p in report.fused]
    assert str(report).startswith(f"{len(report.fused)} fused parts")


# ------------------------------------------------------------------ hooks
def _add_hook(module, kind, record):
    """A hook that records what it sees and changes what it returns."""
    if kind == "forward":
        return module.register_forward_hook(
            lambda m, args, out: (record.append(out.detach().clone()), out * 2)[1])
    if kind == "pre":
        return module.register_forward_pre_hook(
            lambda m, args: (record.append(args[0].detach().clone()), (args[0] * 0.5,))[1])
    return module.register_full_backward_hook(
        lambda m, gin, gout: (record.append(gout[0].detach().clone()),
                              tuple(None if g is None else g * 3 for g in gin))[1])


HOOK_TARGETS = {  # target -> whether a fused part falls back
    "layer2.0.conv2": True, "layer2.0.bn2": True, "layer1.0": False,
    "layer3.0.downsample": False, "layer3.0.downsample.1": True}


def _step_or_error(model, x):
    try:
        return train_step(model, x)
    except RuntimeError as e:
        return e


@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
@pytest.mark.parametrize("target", list(HOOK_TARGETS))
def test_hooks_fire_with_the_same_tensors(target, kind, calls):
    ref, opt = pair("resnet18", torch.float64)
    records = {}
    for key, model in (("ref", ref), ("opt", opt)):
        records[key] = []
        _add_hook(model.get_submodule(target), kind, records[key])
    report = explain(opt)
    assert len(report.fused) == fused_parts_expected(opt) - HOOK_TARGETS[target]
    if HOOK_TARGETS[target]:
        assert any(target in p.covers and "hook" in p.reason for p in report.left)
    x = inputs(torch.float64)
    got, want = _step_or_error(opt, x), _step_or_error(ref, x)
    if isinstance(want, RuntimeError):
        # torchvision's own forward refuses this one (a full backward hook on
        # bn2, whose output `out += identity` modifies): so must ours.
        assert isinstance(got, RuntimeError) and str(got) == str(want)
        return
    assert calls["total"]() == len(report.fused)
    assert rel(got[0], want[0]) < 1e-6 and rel(got[1], want[1]) < 1e-6
    assert len(records["opt"]) == len(records["ref"]) == 1  # once per call
    assert rel(records["opt"][0], records["ref"][0]) < 1e-6
    for (n, p), q in zip(opt.named_parameters(), ref.parameters()):
        assert rel(p.grad, q.grad) < 1e-6, n


def test_hook_removed_fuses_again(calls):
    _, opt = pair("resnet18")
    handle = opt.layer2[0].bn2.register_forward_hook(lambda m, a, o: None)
    assert len(explain(opt).fused) == fused_parts_expected(opt) - 1
    handle.remove()
    assert len(explain(opt).fused) == fused_parts_expected(opt)
    with torch.no_grad():
        opt.eval()(inputs())
    assert calls["total"]() == fused_parts_expected(opt)


def test_global_forward_hook(calls):
    ref, opt = pair("resnet18")
    names = {id(m): n for model in (ref, opt) for n, m in model.named_modules()}
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append((names[id(m)], out.detach().clone())))
    try:
        assert not explain(opt).fused
        x = inputs()
        ref.eval(), opt.eval()
        with torch.no_grad():
            ref(x)
            from_ref, seen[:] = list(seen), []
            opt(x)
    finally:
        handle.remove()
    assert calls["total"]() == 0
    assert [n for n, _ in seen] == [n for n, _ in from_ref]
    assert all(rel(a, b) < 1e-4 for (_, a), (_, b) in zip(seen, from_ref))


# ------------------------------------------------------------------ structure changes
class _Scale(nn.Module):
    def forward(self, w):
        return w * 1.5


def _train_and_eval_match(ref, opt):
    x = inputs(torch.float64)
    y_ref, gx_ref = train_step(ref, x)
    y_opt, gx_opt = train_step(opt, x)
    assert rel(y_opt, y_ref) < 1e-6 and rel(gx_opt, gx_ref) < 1e-6
    ref.eval(), opt.eval()
    with torch.no_grad():
        assert rel(opt(x), ref(x)) < 1e-6


def test_parametrized_conv_falls_back(calls):
    ref, opt = pair("resnet18", torch.float64)
    for model in (ref, opt):
        parametrize.register_parametrization(model.layer2[0].conv1, "weight", _Scale())
    left = explain(opt).left
    assert [(p.covers[0], p.reason) for p in left] == [("layer2.0.conv1", "layer2.0.conv1 is parametrized")]
    _train_and_eval_match(ref, opt)
    assert calls["total"]() == 2 * (fused_parts_expected(opt) - 1)


class _MyBN(nn.BatchNorm2d):
    pass


def _replace(model, name, make):
    parent, _, attr = name.rpartition(".")
    old = model.get_submodule(name)
    new = make(old)
    new.load_state_dict(old.state_dict())
    setattr(model.get_submodule(parent), attr, new.to(old.weight.dtype))


def test_bn_subclass_falls_back(calls):
    ref, opt = pair("resnet18", torch.float64)
    for model in (ref, opt):
        _replace(model, "layer1.0.bn1", lambda bn: _MyBN(bn.num_features))
    assert any("_MyBN, not BatchNorm2d" in p.reason for p in explain(opt).left)
    _train_and_eval_match(ref, opt)
    assert calls["total"]() == 2 * (fused_parts_expected(opt) - 1)


def test_sync_batchnorm_falls_back(calls):
    ref, opt = pair("resnet18")
    for model in (ref, opt):  # eval only: SyncBatchNorm trains with a process group
        _replace(model, "layer1.0.bn1", lambda bn: nn.SyncBatchNorm(bn.num_features))
    assert any("SyncBatchNorm" in p.reason for p in explain(opt).left)
    ref.eval(), opt.eval()
    with torch.no_grad():
        assert rel(opt(inputs()), ref(inputs())) < 1e-4
    assert calls["total"]() == fused_parts_expected(opt) - 1


def test_replaced_activation_falls_back(calls):
    ref, opt = pair("resnet18", torch.float64)
    for model in (ref, opt):
        model.layer3[1].relu = nn.GELU()
    left = explain(opt).left
    assert [p.covers[-1] for p in left] == ["layer3.1.relu", "layer3.1.relu"]
    _train_and_eval_match(ref, opt)
    assert calls["total"]() == 2 * (fused_parts_expected(opt) - 2)


def test_conv_padding_mode_falls_back(calls):
    ref, opt = pair("user_cnn", torch.float64)
    for model in (ref, opt):
        model[0].padding_mode = "reflect"
    assert "padding_mode='reflect'" in explain(opt).left[0].reason
    _train_and_eval_match(ref, opt)
    assert calls["total"]() == 2 * (fused_parts_expected(opt) - 1)


def test_unsupported_device_falls_back(calls):
    ref, opt = pair("user_cnn")
    x = inputs().to("meta")  # shapes only: the ops do not run on meta tensors
    assert opt.to("meta").eval()(x).shape == ref.to("meta").eval()(x).shape
    assert calls["total"]() == 0


def test_sequential_edited_after_optimize(calls):
    torch.manual_seed(0)
    ref = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    opt = optimize(ref)
    assert [p.op for p in explain(opt).fused] == ["conv_bn_act(act='identity')"]
    for model in (ref, opt):
        model.append(nn.SiLU())
    assert [p.op for p in explain(opt).fused] == ["conv_bn_act(act='silu')"]
    x = inputs(torch.float64)
    ref.double(), opt.double()
    assert rel(opt(x), ref(x)) < 1e-6
    assert calls["conv_bn_act"] == 1


def test_forward_overridden_before_optimize_is_left_alone(calls):
    ref, _ = pair("resnet18")
    ref.layer1[0].forward = lambda x: x  # the user's own computation
    opt = optimize(ref)
    x = inputs()
    assert opt.layer1[0](x) is x  # still the user's forward
    assert "forward" in opt.layer2[0].__dict__ and "layer1.0" not in {
        p.module for p in explain(opt).fused}
    assert any(p.module == "layer1.0" and "overridden" in p.reason for p in explain(opt).left)


def test_fx_trace_sees_the_original_modules(calls):
    ref, opt = pair("resnet18")
    g_ref, g_opt = torch.fx.symbolic_trace(ref), torch.fx.symbolic_trace(opt)
    assert [(n.op, n.name, n.target) for n in g_opt.graph.nodes] == [
        (n.op, n.name, n.target) for n in g_ref.graph.nodes]
    assert calls["total"]() == 0


def test_jit_trace_records_the_original_modules(calls):
    ref, opt = pair("user_cnn")
    ref.eval(), opt.eval()
    x = inputs()
    with torch.no_grad():
        traced = torch.jit.trace(opt, x, check_trace=False)  # its check reruns eagerly
        assert rel(traced(x), ref(x)) < 1e-4
    assert calls["total"]() == 0
    assert "convkernels" not in str(traced.inlined_graph)


class _Logged(torch.Tensor):
    """A __torch_function__ subclass: it sees every torch call, so the fused
    ops (other calls) must not run on it."""
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_input_falls_back(calls):
    ref, opt = pair("user_cnn")
    ref.eval(), opt.eval()
    x = inputs()
    with torch.no_grad():
        _Logged.seen = []
        y_ref = ref(x.as_subclass(_Logged))
        seen_ref, _Logged.seen = _Logged.seen, []
        y_opt = opt(x.as_subclass(_Logged))
    assert calls["total"]() == 0
    assert _Logged.seen == seen_ref and "batch_norm" in seen_ref
    assert rel(y_opt.as_subclass(torch.Tensor), y_ref.as_subclass(torch.Tensor)) < 1e-6


# ------------------------------------------------------------------ builders
RESNET_BUILDERS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                   "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                   "wide_resnet50_2", "wide_resnet101_2"]


@pytest.mark.parametrize("name", RESNET_BUILDERS)
def test_builder_signature_is_torchvision(name):
    """torchvision's parameters, plus stochastic_depth_prob (default 0: off)."""
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    ours = params(getattr(convkernels.models, name))
    extra = ("stochastic_depth_prob", inspect.Parameter.KEYWORD_ONLY, 0.0)
    assert extra in ours
    ours.remove(extra)
    assert ours == params(getattr(torchvision.models, name))


def test_builder_is_torchvision_plus_optimize():
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=7)
    torch.manual_seed(0)
    ours = convkernels.models.resnet18(num_classes=7)
    assert type(ours) is ResNet
    sd, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd) == list(sd_theirs) and all(torch.equal(sd[k], sd_theirs[k]) for k in sd)
    assert len(explain(ours).fused) == fused_parts_expected(ours)


def _bound_modules(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("part", ["", "layer1"])
def test_jit_script_compiles_the_model_it_was(part, calls):
    """Script compiles the classes' own forwards (on copies: it rewrites the
    module tree it walks), and the optimized model stays fused."""
    ref, opt = pair("resnet18")
    ref.eval(), opt.eval()
    bound = _bound_modules(opt)
    target, ref_target = opt.get_submodule(part), ref.get_submodule(part)
    scripted = torch.jit.script(target)
    x = inputs() if not part else ref.maxpool(ref.relu(ref.bn1(ref.conv1(inputs()))))
    with torch.no_grad():
        assert rel(scripted(x), ref_target(x)) < 1e-6
        assert calls["total"]() == 0  # the scripted model runs no fused op
        assert _bound_modules(opt) == bound
        assert rel(opt(inputs()), ref(inputs())) < 1e-4
    assert calls["total"]() == fused_parts_expected(opt)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_export_records_the_modules_graph(mode, calls):
    """torch.export (and ONNX through it) gets standard aten ops with a dynamic
    batch: no convkernels op in the graph."""
    ref, opt = pair("resnet18", torch.float64)
    ref.train(mode == "train"), opt.train(mode == "train")
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(opt, (inputs(torch.float64),), dynamic_shapes={"x": {0: batch}})
    assert not [n for n in ep.graph.nodes if "convkernels" in str(n.target)]
    assert calls["total"]() == 0
    x = inputs(torch.float64, seed=2).repeat(2, 1, 1, 1)  # another batch size
    want = copy.deepcopy(ref)(x)
    assert rel(ep.module()(x), want) < 1e-10


# -------------------------------------------- conv -> act without BatchNorm: conv_act
def plain_cnn() -> nn.Module:
    """Conv2d -> act runs without BatchNorm, and a conv that a BN follows."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 1, bias=False), nn.SiLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # conv_bn_act first
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


# name: (model, input size, conv_act parts)
CONV_ACT_MODELS = {"plain_cnn": (plain_cnn, 16, 3),
                   "vgg11_features": (lambda: torchvision.models.vgg11().features, 32, 8),
                   "alexnet_features": (lambda: torchvision.models.alexnet().features, 63, 5)}


def _conv_act_pair(name, dtype=torch.float32):
    torch.manual_seed(0)
    ref = randomise_bn(CONV_ACT_MODELS[name][0]()).to(dtype)
    return ref, optimize(ref)


def _conv_act_input(name, dtype=torch.float32, seed=1):
    s = CONV_ACT_MODELS[name][1]
    return torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", list(CONV_ACT_MODELS))
def test_conv_act_runs_fused_and_matches(name):
    ref, opt = _conv_act_pair(name)
    parts = [p for p in explain(opt).fused if p.op.startswith("conv_act")]
    assert len(parts) == CONV_ACT_MODELS[name][2], explain(opt)
    x = _conv_act_input(name)
    for training in (False, True):
        ref.train(training), opt.train(training)
        for grad in (False, True):
            with torch.set_grad_enabled(grad), ConvkernelsOps() as seen:
                y = opt(x)
            assert any(op.startswith("convkernels.conv_act") for op in seen.seen), seen.seen
            with torch.set_grad_enabled(grad):
                assert rel(y, ref(x)) < 1e-4, (training, grad)


@pytest.mark.parametrize("name", list(CONV_ACT_MODELS))
def test_conv_act_float64_train_step(name):
    ref, opt = _conv_act_pair(name, torch.float64)
    x = _conv_act_input(name, torch.float64)
    with ConvkernelsOps() as seen:
        y, gx = train_step(opt, x)
    assert {"convkernels.conv_act_forward.default",
            "convkernels.conv_act_backward.default"} <= seen.seen, seen.seen
    y_ref, gx_ref = train_step(ref, x)
    assert rel(y, y_ref) < 1e-6
    assert rel(gx, gx_ref) < 1e-6
    assert_grads_and_buffers_match(opt, ref)


def test_conv_act_hook_runs_that_part_unfused():
    """A forward hook on a conv: that conv and its ReLU run as modules (the
    hook fires once, with the conv's output, and what it returns is used);
    the other parts stay fused."""
    name = "vgg11_features"
    ref, opt = _conv_act_pair(name)
    x = _conv_act_input(name)
    fired = {"ref": [], "opt": []}
    for key, model in (("ref", ref), ("opt", opt)):
        model[3].register_forward_hook(
            lambda m, args, out, rec=fired[key]: (rec.append(out.detach().clone()), out * 2)[1])
    report = explain(opt)
    left = [p for p in report.left if "3" in p.covers]
    assert left and "has a forward hook" in left[0].reason, report
    assert len(report.fused) == CONV_ACT_MODELS[name][2] - 1
    ref.eval(), opt.eval()
    for grad in (False, True):
        with torch.set_grad_enabled(grad), ConvkernelsOps() as seen:
            y = opt(x)
        assert any(op.startswith("convkernels.conv_act") for op in seen.seen)
        with torch.set_grad_enabled(grad):
            assert rel(y, ref(x)) < 1e-4
    assert len(fired["opt"]) == len(fired["ref"]) == 2  # once a forward
    for a, b in zip(fired["opt"], fired["ref"]):
        assert rel(a, b) < 1e-6
