"""nt_xent_loss (SimCLR) on every backend against the eager formula
(convkernels.ops.reference.nt_xent_loss, run in float64 on the same inputs):
loss and the gradients of z1 and z2, gradcheck, opcheck of every op, bad input."""
import math

import pytest
import torch
from torch.library import opcheck

import convkernels
from convkernels.ops import reference

from harness import TARGET_IDS, TARGETS, on, requires

ops = torch.ops.convkernels

# (atol, rtol) of the loss; relative norm error ||a - b|| / ||b|| of each gradient,
# or EAGER_SLACK times the eager formula's own in that dtype if larger: near the
# optimum (correlated views, temperature 0.07) W = P + P' - 2 cancels at the
# positives, and eager fp32 itself is 2e-4 off float64 (N=7, D=16).
# bf16: the views are rounded to bf16 (their norms and the tensor-core dot on GPU
# see 8-bit mantissas), and the loss is returned in bf16.
EAGER_SLACK = 3
TOL = {
    torch.float32: {"loss": (1e-5, 1e-5), "grad": 1e-4},
    torch.bfloat16: {"loss": (5e-2, 2e-2), "grad": 5e-2},
}

# The interpreter runs every tile in numpy: small N only there.
NS, SMALL_NS = (1, 2, 7, 64, 256), (1, 2, 7)


def _views(n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    # Correlated positives, as SimCLR's two augmentations give: the loss is not at chance.
    z2 = z1 + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1.to(device, dtype), z2.to(device, dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(target, dtype, n, d, temperature):
    z1, z2 = _views(n, d, dtype, target.device, seed=n + d)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    with on(target):
        loss = convkernels.ops.nt_xent_loss(a, b, temperature)
    loss.backward()
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (z1, z2))
    ref = reference.nt_xent_loss(a64, b64, temperature)
    ref.backward()
    assert loss.dtype == dtype and loss.shape == ()
    atol, rtol = TOL[dtype]["loss"]
    torch.testing.assert_close(loss.double(), ref.detach(), atol=atol, rtol=rtol)
    if n == 1:  # one positive and no negative: loss 0, gradient 0 exactly
        assert a.grad.abs().max() == 0 and b.grad.abs().max() == 0
        return
    ea, eb = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    reference.nt_xent_loss(ea, eb, temperature).backward()
    for name, got, eager, want in (("z1", a.grad, ea.grad, a64.grad), ("z2", b.grad, eb.grad, b64.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        err, bound = _rel(got, want), max(TOL[dtype]["grad"], EAGER_SLACK * _rel(eager, want))
        assert err <= bound, f"grad {name}: relative norm error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", (16, 128))
@pytest.mark.parametrize("temperature", (0.07, 0.5))
def test_matches_eager(target, dtype, n, d, temperature):
    requires(target, dtype)
    if target.small and n not in SMALL_NS:
        pytest.skip("the Triton interpreter runs small N only")
    _check(target, dtype, n, d, temperature)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_ragged_sizes(target):
    """N and D that fill no tile: every masked edge of the row, column and feature blocks."""
    n, d = (9, 70) if target.small else (161, 300)
    _check(target, torch.float32, n, d, 0.2)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_zero_row(target):
    """A zero view: F.normalize's clamp (u = 0, gradient z / eps past it) as in eager."""
    z1, z2 = _views(3, 16, torch.float32, target.device)
    z1[1] = 0
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    with on(target):
        convkernels.ops.nt_xent_loss(a, b, 0.5).backward()
    a64, b64 = (t.double().requires_grad_(True) for t in (z1, z2))
    reference.nt_xent_loss(a64, b64, 0.5).backward()
    assert _rel(a.grad, a64.grad) <= 1e-4 and _rel(b.grad, b64.grad) <= 1e-4


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_float64(backend):
    if backend == "cpu" and not convkernels.backend.available("cpu", "cpu"):
        pytest.skip("convkernels._C not built")
    z1, z2 = _views(5, 6, torch.float64, "cpu", seed=3)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    for t in (0.07, 0.5):
        def f(a, b):
            with convkernels.use_backend(backend):
                return convkernels.ops.nt_xent_loss(a, b, t)
        assert torch.autograd.gradcheck(f, (z1, z2)), t


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_opcheck(target):
    z1, z2 = _views(3, 16, torch.float32, target.device, seed=5)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    z = torch.cat([z1, z2]).detach().requires_grad_(True)
    with on(target):
        opcheck(ops.nt_xent_loss, (z1, z2, 0.3))
        opcheck(ops.nt_xent_forward, (z, 0.3, target.backend))
        _, lse = ops.nt_xent_forward(z.detach(), 0.3, target.backend)
        grad = torch.tensor(1.5, device=target.device)
        opcheck(ops.nt_xent_backward, (grad, z.detach(), lse, 0.3, target.backend))


def test_under_torch_compile():
    z1, z2 = _views(4, 16, torch.float32, "cpu", seed=6)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    f = torch.compile(convkernels.ops.nt_xent_loss, fullgraph=True)
    f(a, b, 0.5).backward()
    a64, b64 = (t.double().requires_grad_(True) for t in (z1, z2))
    reference.nt_xent_loss(a64, b64, 0.5).backward()
    assert _rel(a.grad, a64.grad) <= 1e-4 and _rel(b.grad, b64.grad) <= 1e-4


def _bad(kind):
    z = torch.randn(4, 8)
    return {
        "shape": ((z, torch.randn(3, 8)), {}, ValueError, "z2 has shape"),
        "width": ((z, torch.randn(4, 9)), {}, ValueError, "z2 has shape"),
        "1d": ((torch.randn(8), torch.randn(8)), {}, ValueError, "z1 must be a 2-D"),
        "3d": ((z, torch.randn(4, 8, 1)), {}, ValueError, "z2 must be a 2-D"),
        "empty": ((torch.randn(0, 8), torch.randn(0, 8)), {}, ValueError, "N = 0"),
        "no-features": ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "D = 0"),
        "temp-zero": ((z, z), {"temperature": 0.0}, ValueError, "temperature"),
        "temp-negative": ((z, z), {"temperature": -0.5}, ValueError, "temperature"),
        "temp-nan": ((z, z), {"temperature": math.nan}, ValueError, "temperature"),
        "temp-inf": ((z, z), {"temperature": math.inf}, ValueError, "temperature"),
        "dtype": ((z, z.double()), {}, TypeError, "z2 has dtype"),
        "int": ((z.long(), z.long()), {}, TypeError, "z1 must be float32"),
        "device": ((z, z.to("meta")), {}, ValueError, "z2 is on meta"),
    }[kind]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["shape", "width", "1d", "3d", "empty", "no-features", "temp-zero",
                                  "temp-negative", "temp-nan", "temp-inf", "dtype", "int",
                                  "device"])
def test_bad_input(backend, kind):
    if backend == "cpu" and not convkernels.backend.available("cpu", "cpu"):
        pytest.skip("convkernels._C not built")
    args, kwargs, exc, match = _bad(kind)
    with convkernels.use_backend(backend), pytest.raises(exc, match=match):
        convkernels.ops.nt_xent_loss(*args, **kwargs)
