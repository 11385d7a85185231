"""Shared test harness: which backends run here, inputs in every layout, and the
per-dtype tolerance table. Every op test compares a backend with the aten
reference (convkernels.ops.reference) on the same inputs."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

import convkernels
from convkernels import backend

HAS_GPU = torch.cuda.is_available()


@dataclass(frozen=True)
class Target:
    """A backend and the device its tests run on."""

    backend: str
    device: str
    small: bool  # the Triton interpreter is slow: small shapes only

    def __str__(self):
        return f"{self.backend}-{self.device}"


def _targets():
    targets = [
        pytest.param(Target("cpu", "cpu", False), marks=pytest.mark.skipif(
            not backend.available("cpu", "cpu"), reason="convkernels._C not built")),
        pytest.param(Target("triton", "cuda" if HAS_GPU else "cpu", not HAS_GPU),
                     marks=pytest.mark.skipif(
                         not backend.available("triton", "cuda" if HAS_GPU else "cpu"),
                         reason="triton not importable")),
        pytest.param(Target("cuda", "cuda", False), marks=pytest.mark.skipif(
            not (HAS_GPU and backend.available("cuda", "cuda")), reason="needs a GPU and _C with CUDA")),
    ]
    return targets


TARGETS = _targets()
TARGET_IDS = ["cpu", "triton", "cuda"]

# (atol, rtol) against a float64 reference, per dtype: forward outputs and gradients.
TOL = {
    torch.float64: {"out": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    torch.float32: {"out": (1e-5, 1e-5), "grad": (1e-4, 1e-4)},
    torch.float16: {"out": (4e-3, 4e-3)},
    torch.bfloat16: {"out": (3e-2, 3e-2)},
}

LAYOUTS = ("nchw", "channels_last", "strided")


def make(shape, dtype, device, layout="nchw", seed=0, offset=0.0):
    """A random tensor of ``shape`` laid out as asked. ``strided`` is a
    non-contiguous view (every other column of a wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "strided":  # converted before slicing, so the view keeps its gaps
        base = torch.randn(n, c, h, 2 * w, generator=g, dtype=torch.float64) + offset
        return base.to(device=device, dtype=dtype)[..., ::2]
    t = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    t = t.to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout != "nchw":
        raise ValueError(f"make: unknown layout {layout!r}")
    return t


def vector(c, dtype, device, seed, low=0.5, high=1.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g, dtype=torch.float64) * (high - low) + low).to(device, dtype)


# fp16/bf16 gradients are sums of many rounded products: compared by relative
# norm error ||a - b|| / ||b|| instead of elementwise.
GRAD_NORM_TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


def assert_close(actual, expected, dtype, kind, name):
    if kind == "grad" and dtype in GRAD_NORM_TOL:
        err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)
        assert err <= GRAD_NORM_TOL[dtype], f"{name}: relative norm error {err:.3g} > {GRAD_NORM_TOL[dtype]}"
        return
    atol, rtol = TOL[dtype][kind]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def requires(target: Target, dtype: torch.dtype):
    """Skip combinations a backend does not support on this machine."""
    if dtype == torch.float64 and target.device == "cuda" and target.backend == "triton":
        pytest.skip("float64 is tested on CPU")
    if target.small and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


@contextlib.contextmanager
def on(target: Target):
    with convkernels.use_backend(target.backend):
        yield


def clone_leaf(t, requires_grad):
    """A fresh leaf copy of ``t`` (keeps its strides)."""
    if t is None:
        return None
    c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    c.copy_(t.detach())
    return c.requires_grad_(requires_grad)


def to64(t):
    """A float64 leaf copy, for the reference."""
    if t is None:
        return None
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def check_against_reference(target, dtype, tensors, grad_names, call, call_ref, with_grad,
                            buffers=("running_mean", "running_var")):
    """Run ``call`` (on the target backend) and ``call_ref`` (the float64 reference)
    on copies of the same named ``tensors``; compare outputs, the updated
    ``buffers`` and, ``with_grad``, the gradients of ``grad_names``."""
    def leaf(v, k, conv):
        return None if v is None else conv(v).requires_grad_(with_grad and k in grad_names)

    ours = {k: leaf(v, k, lambda t: t.detach().clone()) for k, v in tensors.items()}
    ref = {k: leaf(v, k, lambda t: t.detach().to(torch.float64)) for k, v in tensors.items()}
    with on(target), torch.set_grad_enabled(with_grad):
        y = call(ours)
    y_ref = call_ref(ref)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "grad", "out")
    for name in buffers:
        assert_close(ours[name], ref[name], dtype, "grad", name)
    if with_grad:
        g = make(tuple(y.shape), torch.float64, target.device, seed=42)
        y.backward(g.to(dtype))
        y_ref.backward(g)
        for name in grad_names:
            if ref.get(name) is not None:
                assert_close(ours[name].grad, ref[name].grad, dtype, "grad", f"grad {name}")


def randomise_state(module) -> None:
    """Seeded random values for every floating parameter and buffer of a small
    conv/BN module (variances positive), so that eval and folding are exercised
    on more than the default init."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + (0.5 if "var" in name else -0.1))
