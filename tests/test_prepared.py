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
