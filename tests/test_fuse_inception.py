"""GoogLeNet, Inception v3, VGG-BN and AlexNet under optimize.

Every check compares the optimized model against an unoptimized copy with the
same (BN-randomised) weights and inputs; the expected number of fused ops is
the number of BatchNorm2d calls torchvision's own forward makes (each BN of
these models follows its conv and fuses with it; AlexNet has none).
"""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import convkernels
from convkernels import ops, optimize
from convkernels.fuse import inception
from convkernels.fuse._bind import bound
from model_checks import (assert_grads_and_buffers_match, gets_channels_last,  # noqa: F401
                          one_thread, randomise_bn, rel)

# inception_v3's aux head needs 299x299 inputs in training: built without it.
KWARGS = {"googlenet": {"init_weights": True},
          "inception_v3": {"init_weights": True, "aux_logits": False},
          "vgg11_bn": {}, "alexnet": {}}


# fp32 training compares where BN is well conditioned. At the smallest inputs the
# last stages are 1x1, BN there normalises 2 values per channel, and torchvision's
# own fp32 output is far from its float64 one (measured: inception_v3 at 75x75,
# 9.9e-2; googlenet at 32x32, 9e-5): the float64 test covers those sizes.
TRAIN_SIZE = {"googlenet": 64, "inception_v3": 299}


def min_size(name: str) -> int:
    """The smallest input torchvision's weights declare for the model."""
    return torchvision.models.get_model_weights(name).DEFAULT.meta["min_size"][0]


_BASE = {}


def pair(name: str, dtype=torch.float32):
    if name not in _BASE:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BASE[name] = randomise_bn(getattr(torchvision.models, name)(**KWARGS[name]))
    ref = copy.deepcopy(_BASE[name]).to(dtype)
    return ref, optimize(ref)


def inputs(name: str, dtype=torch.float32, seed=1, size=None):
    s = size or min_size(name)
    return torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def flat(y) -> list:
    """The model's output tensors (GoogLeNet's training output is a tuple)."""
    return [t for t in (y if isinstance(y, (tuple, list)) else (y,)) if t is not None]


def close(ys, refs, tol):
    ys, refs = flat(ys), flat(refs)
    assert len(ys) == len(refs)
    for y, r in zip(ys, refs):
        assert rel(y, r) < tol


def bn_calls(model: nn.Module, x) -> int:
    """BatchNorm2d calls torchvision's forward of ``model`` makes on x (RNG
    state and running statistics kept)."""
    count = [0]
    hooks = [m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    state, buffers = torch.get_rng_state(), [(b, b.clone()) for b in model.buffers()]
    with torch.no_grad():
        model(x)
    torch.set_rng_state(state)
    for b, saved in buffers:
        b.copy_(saved)
    for h in hooks:
        h.remove()
    return count[0]


@pytest.fixture
def calls(monkeypatch):
    counts = {"conv_bn_act": 0}
    op = ops.conv_bn_act

    def counted(*args, **kwargs):
        counts["conv_bn_act"] += 1
        return op(*args, **kwargs)
    monkeypatch.setattr(ops, "conv_bn_act", counted)
    return counts


def seeded(model, x, seed=5):
    """model(x) with a fixed RNG state (dropout draws the same masks)."""
    torch.manual_seed(seed)
    return model(x)


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize("name", list(KWARGS))
def test_fp32_outputs_match(name, calls):
    ref, opt = pair(name)
    x = inputs(name)
    ref.eval(), opt.eval()
    expected = bn_calls(ref, x)
    with torch.no_grad():
        close(opt(x), ref(x), 1e-4)
    assert calls["conv_bn_act"] == expected
    calls["conv_bn_act"] = 0
    close(opt(x), ref(x), 1e-4)  # eval with autograd
    assert calls["conv_bn_act"] == expected
    ref.train(), opt.train()
    x = inputs(name, size=TRAIN_SIZE.get(name))
    expected = bn_calls(ref, x)
    calls["conv_bn_act"] = 0
    close(seeded(opt, x), seeded(ref, x), 1e-4)
    assert calls["conv_bn_act"] == expected
    if name != "alexnet":
        assert expected > 0


def train_step(model, x):
    model.train()
    x = x.clone().requires_grad_()
    ys = flat(seeded(model, x))
    loss = sum((y * torch.randn(y.shape, generator=torch.Generator().manual_seed(i),
                                dtype=y.dtype)).sum() for i, y in enumerate(ys))
    loss.backward()
    return ys, x.grad


@pytest.mark.parametrize("name", list(KWARGS))
def test_float64_train_step_grads_and_running_stats(name, calls):
    ref, opt = pair(name, torch.float64)
    x = inputs(name, torch.float64)
    ref.train()
    expected = bn_calls(ref, x)
    with convkernels.use_backend("cpu"):
        ys_ref, gx_ref = train_step(ref, x)
        ys_opt, gx_opt = train_step(opt, x)
    assert calls["conv_bn_act"] == expected
    close(ys_opt, ys_ref, 1e-6)
    assert rel(gx_opt, gx_ref) < 1e-6
    assert_grads_and_buffers_match(opt, ref)


# ------------------------------------------------------------ the concatenation
BLOCKS = {"googlenet": ["inception3a", "inception4e"],
          "inception_v3": ["Mixed_5b", "Mixed_6a", "Mixed_6b", "Mixed_7a", "Mixed_7b"]}


def _block_input(model, name, block, x):
    seen = {}
    h = getattr(model, block).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen["x"]


@pytest.mark.parametrize("name,block", [(n, b) for n, bs in BLOCKS.items() for b in bs])
def test_block_equals_torchvision_cat_exactly(name, block):
    """The slices the fused block writes hold exactly what torchvision's cat of
    the same (fused) branches holds, with autograd (eval and training: the op
    fills ``out=`` by a copy). Without autograd the CPU's 1x1-conv GEMM writes
    straight into its slice, rounding as a GEMM with that row stride does
    (measured: ulps, 6e-8 on googlenet's inception4e): close, not equal."""
    _, opt = pair(name)
    opt.eval()
    m = getattr(opt, block)
    x = _block_input(opt, name, block, inputs(name))
    cls_forward = type(m).forward  # torchvision's: branches, then torch.cat
    assert inception.bound(m) is not None
    with torch.no_grad():
        assert rel(m(x), cls_forward(m, x)) < 1e-6
    assert torch.equal(m(x), cls_forward(m, x))
    m.train()
    assert torch.equal(m(x), cls_forward(m, x))


HOOKED = {"googlenet": "inception3a.branch2.1.conv", "inception_v3": "Mixed_5b.branch5x5_2.conv"}


@pytest.mark.parametrize("name", list(HOOKED))
def test_hook_on_one_branch_conv(name, calls):
    """The hooked branch runs its modules (the hook fires with torchvision's
    tensor and what it returns is used), the others stay fused."""
    ref, opt = pair(name)
    x = inputs(name)
    ref.eval(), opt.eval()
    seen = {}

    def hook(key):
        def fn(module, args, output):
            seen[key] = output.clone()
            return output * 2  # used: the block's output changes accordingly
        return fn
    ref.get_submodule(HOOKED[name]).register_forward_hook(hook("ref"))
    opt.get_submodule(HOOKED[name]).register_forward_hook(hook("opt"))
    expected = bn_calls(ref, x) - 1
    with torch.no_grad():
        y, y_ref = opt(x), ref(x)
    assert rel(seen["opt"], seen["ref"]) < 1e-4
    assert rel(y, y_ref) < 1e-4
    assert calls["conv_bn_act"] == expected
    block = opt.get_submodule(HOOKED[name].split(".")[0])
    xb = _block_input(opt, name, HOOKED[name].split(".")[0], x)
    with torch.no_grad():
        assert torch.equal(block(xb), type(block).forward(block, xb))


def test_hook_changing_the_shape_falls_back_to_cat():
    """A branch result that does not fit its slice: torchvision's cat of it."""
    ref, opt = pair("googlenet")
    ref.eval(), opt.eval()
    xb = _block_input(ref, "googlenet", "inception3a", inputs("googlenet"))
    for model in (ref, opt):
        model.inception3a.branch1.register_forward_hook(lambda m, a, out: out[:, :5])
    with torch.no_grad():
        y, y_ref = opt.inception3a(xb), ref.inception3a(xb)
    assert y.shape[1] == 256 - 64 + 5
    close(y, y_ref, 1e-4)


def test_fx_sees_torchvision_graph():
    _, opt = pair("googlenet")
    gm = torch.fx.symbolic_trace(opt.eval())
    assert any(n.target is torch.cat for n in gm.graph.nodes)


# ------------------------------------------------------------------ layout
# Top level -> (its bound forward, its stem BasicConv2d, the module after the stem).
TOPS = {"googlenet": (inception.googlenet_forward, "conv1", "maxpool1"),
        "inception_v3": (inception.inception3_forward, "Conv2d_1a_3x3", "Conv2d_2a_3x3")}


@pytest.mark.parametrize("name", list(TOPS))
def test_top_level_runs_the_trunk_channels_last_on_cpu(name):
    """The fused stem makes the trunk channels_last (fp32 and float64), so the
    numbers tests above compare it against torchvision's NCHW model; not on the
    reference backend, nor with a hook on the stem."""
    forward, stem, after = TOPS[name]
    ref, opt = pair(name)
    assert bound(opt).fn is forward
    assert [p.covers for p in convkernels.explain(opt) if p.module == ""] == [
        (f"{stem}.conv", f"{stem}.bn")]
    for dtype in (torch.float32, torch.float64):
        x = inputs(name, dtype)
        assert gets_channels_last(opt.to(dtype), after, x)
        assert not gets_channels_last(ref.to(dtype), after, x)
    with convkernels.use_backend("reference"):
        assert not gets_channels_last(opt, after, x)
    opt.get_submodule(stem).register_forward_pre_hook(lambda m, args: None)
    assert not gets_channels_last(opt, after, x)


@pytest.mark.parametrize("name", list(TOPS))
def test_fx_traces_torchvisions_graph_through_the_top_level(name):
    """Traced inside a wrapper, FX runs the bound top-level forward on proxies:
    torchvision's graph, without a layout change."""
    ref, opt = pair(name)
    ref.eval(), opt.eval()
    traced, theirs = (torch.fx.symbolic_trace(nn.Sequential(m)) for m in (opt, ref))
    assert [n.target for n in traced.graph.nodes] == [n.target for n in theirs.graph.nodes]
    x = inputs(name)
    with torch.no_grad():
        close(traced(x), ref(x), 1e-4)


# ------------------------------------------------------------------ builders
@pytest.mark.parametrize("name", ["googlenet", "inception_v3", "vgg11_bn", "alexnet"])
def test_builder_is_torchvisions_plus_optimize(name):
    kwargs = {k: v for k, v in KWARGS[name].items() if k != "init_weights"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref = getattr(torchvision.models, name)(**kwargs)
        torch.manual_seed(0)
        model = getattr(convkernels.models, name)(**kwargs)
    assert type(model) is type(ref)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref) and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    assert convkernels.explain(model).fused


def test_vgg_fuses_every_conv():
    """conv -> BN -> ReLU as conv_bn_act in the _bn variants, conv -> ReLU as
    conv_act in the plain ones."""
    for bn in (True, False):
        name = "vgg11_bn" if bn else "vgg11"
        model = getattr(convkernels.models, name)()
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        report = convkernels.explain(model)
        assert len(report.fused) == convs and not report.left
        op = "conv_bn_act" if bn else "conv_act"
        assert all(p.op.startswith(op + "(") for p in report.fused)


def test_vgg_trunk_layout_in_eval_only():
    """VGG's trunk runs channels_last on CPU in eval (fuse.vgg), the caller's
    layout in training and wherever a hook on ``features`` would see the
    converted input; the outputs equal torchvision's either way."""
    torch.manual_seed(0)
    ref = torchvision.models.vgg11_bn(num_classes=10)
    model = convkernels.optimize(ref)
    x = torch.randn(2, 3, 64, 64)
    seen = []
    model.features[3].register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    for training, hook_features, expected in ((False, False, True), (True, False, False),
                                              (False, True, False)):
        model.train(training), ref.train(training)
        handle = model.features.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].is_contiguous())) if hook_features else None
        seen.clear()
        torch.manual_seed(1)
        y = model(x)
        torch.manual_seed(1)
        close(y, ref(x), 1e-4)
        assert seen[-1] is expected, (training, hook_features)
        if handle is not None:
            assert seen[0] is True  # the hook on features got the caller's NCHW tensor
            handle.remove()
