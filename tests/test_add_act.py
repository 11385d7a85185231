"""add_act on every backend against the aten reference."""
import pytest
import torch

import convkernels
from convkernels.ops import reference

from harness import (LAYOUTS, TARGET_IDS, TARGETS, assert_close, clone_leaf, make, on, requires,
                     to64)

ACTS = ("relu", "identity", "silu", "sigmoid")


def _scale(n, device, kind):
    if kind == "none":
        return None
    # Stochastic depth: dropped samples get 0, kept ones 1/(1-p).
    keep = torch.tensor([1.0, 0.0, 1.0][:n] + [1.0] * max(0, n - 3), device=device)
    return keep / 0.8


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("scale_kind", ["none", "stochastic-depth"])
def test_matches_reference(target, dtype, layout, act, scale_kind):
    requires(target, dtype)
    shape = (3, 3, 5, 7) if target.small else (3, 21, 9, 11)
    x = make(shape, dtype, target.device, layout, seed=1)
    r = make(shape, dtype, target.device, layout, seed=2)
    scale = _scale(shape[0], target.device, scale_kind)
    g = make(shape, dtype, target.device, seed=3)

    xs, rs = clone_leaf(x, True), clone_leaf(r, True)
    with on(target):
        y = convkernels.ops.add_act(xs, rs, act, scale)
    y.backward(g)
    xr, rr = to64(x.requires_grad_(True)), to64(r.requires_grad_(True))
    y_ref = reference.add_act(xr, rr, act, None if scale is None else scale.double())
    y_ref.backward(g.double())

    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "out", "out")
    assert_close(xs.grad, xr.grad, dtype, "grad", "grad x")
    assert_close(rs.grad, rr.grad, dtype, "grad", "grad residual")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_only_residual_needs_grad(target):
    shape = (2, 3, 4, 5)
    x = make(shape, torch.float32, target.device, seed=1)
    r = make(shape, torch.float32, target.device, seed=2).requires_grad_(True)
    with on(target):
        convkernels.ops.add_act(x, r, "relu").sum().backward()
    expected = (reference.add_act(x, r.detach(), "identity") > 0).float()
    assert_close(r.grad, expected.double(), torch.float32, "grad", "grad residual")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_shared_gradient_gives_leaves_their_own_grad(target):
    """Without a scale the backward computes gz once for both inputs; the two
    leaves still get separate .grad tensors (in-place updates stay apart)."""
    shape = (2, 3, 4, 5)
    x = make(shape, torch.float32, target.device, seed=1).requires_grad_(True)
    r = make(shape, torch.float32, target.device, seed=2).requires_grad_(True)
    with on(target):
        convkernels.ops.add_act(x, r, "relu").sum().backward()
    expected = (reference.add_act(x.detach(), r.detach(), "identity") > 0).float()
    assert_close(x.grad, expected.double(), torch.float32, "grad", "grad x")
    assert torch.equal(x.grad, r.grad)
    x.grad.add_(1)
    assert_close(r.grad, expected.double(), torch.float32, "grad", "grad residual")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_gradcheck_float64(target):
    if target.device != "cpu":
        pytest.skip("gradcheck runs on CPU")
    shape, acts = ((3, 2, 2, 3), ("relu", "silu")) if target.small else ((3, 2, 3, 4), ACTS)
    x = make(shape, torch.float64, "cpu", seed=1).requires_grad_(True)
    r = make(shape, torch.float64, "cpu", seed=2).requires_grad_(True)
    scale = _scale(3, "cpu", "stochastic-depth").double()
    for act in acts:
        def f(x, r):
            with on(target):
                return convkernels.ops.add_act(x, r, act, scale)
        assert torch.autograd.gradcheck(f, (x, r)), act
