"""Helpers the model test files share: one thread per test module, BN state
away from its init, the relative error, and the float64 train-step comparison
of every gradient and buffer."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny inputs gain nothing from threads, and on a busy machine OpenMP's
    waiting threads cost many times the work (measured: 40x). Autouse in each
    module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise_bn(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their init, so that
    eval is not the identity on BN."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(3)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; below 1e-6 the norm is rounding noise (the gradient of a
    conv bias before a training-mode BN is zero in exact arithmetic)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def assert_grads_and_buffers_match(model: nn.Module, ref: nn.Module, tol: float = 1e-6) -> None:
    """Every parameter gradient and buffer of ``model`` against ``ref``'s (same
    names): within ``tol`` relative; integer buffers (num_batches_tracked) equal."""
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert rel(p.grad, ref_params[n].grad) < tol, n
    ref_buffers = dict(ref.named_buffers())
    for n, b in model.named_buffers():
        if b.dtype == torch.long:
            assert torch.equal(b, ref_buffers[n]), n
        else:
            assert rel(b, ref_buffers[n]) < tol, n


def gets_channels_last(model: nn.Module, name: str, x: torch.Tensor) -> bool:
    """Whether submodule ``name`` of ``model`` gets a channels_last input in an
    eval forward of ``x`` (a forward pre-hook looks, then goes)."""
    seen = []
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        hook.remove()
        model.train(training)
    return seen[0]


class ConvkernelsOps(TorchDispatchMode):
    """Records which convkernels ops run (the fused path's footprint)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "convkernels":
            self.seen.add(str(func))
        return func(*args, **(kwargs or {}))
