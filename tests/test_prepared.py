"""Prepared CPU inference calls (fuse/_prepared.py): an optimized model's conv
parts run a kept plan in eval without autograd, and every change the plan
depends on — parameters and buffers (in place, optimizer step,
load_state_dict), module attributes, the input's shape, memory format and
dtype, a residual's layout — prepares it again, so the result is always the
modules' own. A write through ``.data`` is the one change it cannot see:
``convkernels.clear_caches()``."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import convkernels
from convkernels import ops
from convkernels.fuse import _prepared

TOL = dict(rtol=1e-4, atol=1e-5)  # oneDNN's summation order against aten's


class _Counting:
    """Counts the public op calls the fused parts make (a prepared call makes none)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("conv_bn_act", "conv_act"):
            op = getattr(ops, name)

            def counted(*args, op=op, **kw):
                self.calls += 1
                return op(*args, **kw)

            monkeypatch.setattr(ops, name, counted)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU())
    for bn in (net[1], net[6]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _check(ours, ref, x):
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **TOL)


def _in_place(m, x):
    with torch.no_grad():
        m[0].weight.mul_(1.5)
        m[6].running_var.add_(0.5)
    return x


def _optimizer_step(m, x):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x).square().sum().backward()  # eval mode, with autograd: the unprepared path
    opt.step()
    return x


def _load_state_dict(m, x):
    torch.manual_seed(1)
    m.load_state_dict({k: torch.randn_like(v) if v.is_floating_point() else v
                       for k, v in m.state_dict().items()} | {
        "1.running_var": torch.rand(8) + 0.5, "6.running_var": torch.rand(8) + 0.5})
    return x


def _assign(m, x):
    torch.manual_seed(2)
    m[3].weight = nn.Parameter(torch.randn_like(m[3].weight))
    return x


def _attributes(m, x):
    m[0].stride, m[0].padding, m[6].eps = (2, 2), (0, 0), 0.5
    return x


def _batch_and_size(m, x):
    return torch.randn(3, 3, 9, 7, generator=torch.Generator().manual_seed(3))


def _channels_last(m, x):
    return x.contiguous(memory_format=torch.channels_last)


def _float64(m, x):
    m.double()
    return x.double()


def _train_mode(m, x):
    m.train()
    return x


# change -> (what it does to a model and its input, how many of the three parts it
# touches: the parts whose sources, attributes or input it changes).
CHANGES = {f.__name__.lstrip("_"): (f, n) for f, n in (
    (_in_place, 2), (_optimizer_step, 3), (_load_state_dict, 3), (_assign, 1), (_attributes, 3),
    (_batch_and_size, 3), (_channels_last, 3), (_float64, 3), (_train_mode, 2))}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_prepares_again(change, monkeypatch):
    ref = _net()
    ours = convkernels.optimize(copy.deepcopy(ref))
    x = torch.randn(2, 3, 8, 8)
    count = _Counting(monkeypatch)
    _check(ours, ref, x)
    assert count.take() == 3  # conv-bn-relu, conv-relu, conv-bn-silu: the op, then a plan
    _check(ours, ref, x)
    assert count.take() == 0  # all three prepared
    apply, touched = CHANGES[change]
    x_new = apply(ours, x)
    apply(ref, x)
    count.take()  # the optimizer step's forward
    if change == "train_mode":  # BN on batch statistics is never prepared; conv-relu still is
        for _ in range(2):
            with torch.no_grad():
                torch.testing.assert_close(ours(x_new), ref(x_new), **TOL)
            assert count.take() == touched
        return
    _check(ours, ref, x_new)
    assert count.take() == touched  # the op again, once
    _check(ours, ref, x_new)
    # float64 has no oneDNN plan: the op runs every time.
    assert count.take() == (touched if change == "float64" else 0)


def test_a_write_through_data_needs_clear_caches(monkeypatch):
    ref = _net()
    ours = convkernels.optimize(copy.deepcopy(ref))
    x = torch.randn(2, 3, 8, 8)
    _check(ours, ref, x)
    for m in (ours, ref):
        m[0].weight.data.mul_(2.0)  # bumps no version counter
    with torch.no_grad():
        assert not torch.allclose(ours(x), ref(x), **TOL)  # stale, as documented
    convkernels.clear_caches()
    assert not _prepared._PLANS
    _check(ours, ref, x)


def test_residual_layouts_and_grad_mode(monkeypatch):
    """torchvision's BasicBlock joins (conv-BN + residual + ReLU) prepared per
    input layout; with autograd the op runs and gradients flow."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    ours = convkernels.optimize(copy.deepcopy(ref))
    count = _Counting(monkeypatch)
    for fmt in (torch.contiguous_format, torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
        _check(ours, ref, x)
        count.take()
        _check(ours, ref, x)
        assert count.take() == 0
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ours(x).sum().backward()
    assert count.take() > 0 and x.grad is not None
    assert all(p.grad is not None for p in ours.parameters())


def test_never_kept_for_inference_tensor_sources(monkeypatch):
    with torch.inference_mode():
        ref = _net()
        ours = convkernels.optimize(copy.deepcopy(ref))
        x = torch.randn(2, 3, 8, 8)
        count = _Counting(monkeypatch)
        for _ in range(2):
            torch.testing.assert_close(ours(x), ref(x), **TOL)
            assert count.take() == 3
    assert not any(conv in _prepared._PLANS for conv in ours.modules())


# ----------------------------------------------------- prepared ResNet blocks
# fuse/resnet.py: a BasicBlock or Bottleneck whose parts would all run prepared
# runs as one kept chain of conv plans (no public op call), checked once a call.
def _resnet(name):
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(num_classes=10).eval()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m


def _check_model(ours, ref, x):
    """Whole models: the relative norm error (50 layers of fp32 reordering)."""
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def _blocks(m):
    return [b for b in m.modules() if type(b).__name__ in ("BasicBlock", "Bottleneck")]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_resnet_blocks_run_as_prepared_chains(name, fmt, monkeypatch):
    ref = _resnet(name)
    ours = convkernels.optimize(copy.deepcopy(ref))
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=fmt)
    count = _Counting(monkeypatch)
    _check_model(ours, ref, x)
    assert all(b in _prepared._CHAINS for b in _blocks(ours))
    count.take()
    _check_model(ours, ref, x)
    assert count.take() == 0  # the stem prepared, every block a chain
    with torch.inference_mode():
        y = ours(x)
    assert y.is_inference()
    with torch.no_grad():
        assert ((y - ref(x)).norm() / ref(x).norm()).item() < 1e-5


@pytest.mark.parametrize("where", ["conv2", "bn3", "relu", "downsample", "downsample.0"])
def test_an_observed_module_runs_that_block_part_by_part(where, monkeypatch):
    ref = _resnet("resnet50")
    ours = convkernels.optimize(copy.deepcopy(ref))
    x = torch.randn(1, 3, 32, 32)
    _check_model(ours, ref, x)
    seen = []
    ours.layer2[0].get_submodule(where).register_forward_hook(lambda m, i, o: seen.append(1))
    _check_model(ours, ref, x)
    assert seen  # the hooked module ran as itself (relu: three times): no chain ran


def test_resnet_block_follows_tracked_writes_and_clear_caches(monkeypatch):
    ref = _resnet("resnet50")
    ours = convkernels.optimize(copy.deepcopy(ref))
    x = torch.randn(1, 3, 32, 32)
    _check_model(ours, ref, x)
    with torch.no_grad():
        for m in (ours, ref):
            m.layer3[1].bn3.running_var.add_(0.5)
            m.layer2[0].downsample[0].weight.mul_(1.5)
    _check_model(ours, ref, x)
    for m in (ours, ref):
        m.layer1[0].conv2.weight.data.mul_(2.0)  # bumps no version counter
    with torch.no_grad():
        assert not torch.allclose(ours(x), ref(x), **TOL)  # stale, as documented
    convkernels.clear_caches()
    assert not _prepared._CHAINS
    _check_model(ours, ref, x)


def test_stochastic_depth_eval_is_prepared_and_training_is_not(monkeypatch):
    ref = _resnet("resnet18")
    ours = convkernels.optimize(copy.deepcopy(ref), stochastic_depth_prob=0.3)
    x = torch.randn(2, 3, 32, 32)
    count = _Counting(monkeypatch)
    _check_model(ours, ref, x)
    count.take()
    _check_model(ours, ref, x)
    assert count.take() == 0
    ours.train()
    with torch.no_grad():
        ours(x)
    assert count.take() > 0


@pytest.mark.parametrize("where", ["block", "block.1", "block.2", "block.2.fc1", "block.3.1",
                                   "stochastic_depth"])
def test_efficientnet_blocks_chain_and_hooks_break_them(where):
    """EfficientNet's MBConvs run as chains (their convs' plans and the SE
    kernel) in CPU eval; a hook anywhere in one makes it run as modules."""
    torch.manual_seed(0)
    ref = torchvision.models.efficientnet_b0(num_classes=10).eval()
    for bn in ref.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    ours = convkernels.optimize(copy.deepcopy(ref))
    x = torch.randn(1, 3, 64, 64)
    _check_model(ours, ref, x)
    blocks = [b for b in ours.modules() if type(b).__name__ == "MBConv"]
    assert all(b in _prepared._CHAINS for b in blocks)
    _check_model(ours, ref, x)
    seen = []
    ours.features[2][1].get_submodule(where).register_forward_hook(lambda m, i, o: seen.append(1))
    _check_model(ours, ref, x)
    assert seen == [1]
