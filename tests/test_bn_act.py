"""bn_act on every backend against the aten reference."""
import pytest
import torch

import convkernels
from convkernels.ops import reference

from harness import (LAYOUTS, TARGET_IDS, TARGETS, assert_close, clone_leaf, make, on, requires,
                     to64, vector)

ACTS = ("relu", "identity", "silu", "sigmoid")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _case(target, shape, dtype, layout, residual, affine=True, seed=0):
    dev = target.device
    c = shape[1]
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = make(shape, dtype, dev, layout, seed, offset=0.3)
    r = make(shape, dtype, dev, layout, seed + 1) if residual else None
    w = vector(c, pdtype, dev, seed + 2) if affine else None
    b = vector(c, pdtype, dev, seed + 3, -0.5, 0.5) if affine else None
    rm = vector(c, pdtype, dev, seed + 4, -0.2, 0.2)
    rv = vector(c, pdtype, dev, seed + 5, 0.5, 2.0)
    return x, r, w, b, rm, rv


def _run_both(target, shape, dtype, layout, act, residual, training, affine=True):
    """Forward and backward of the backend and of the float64 reference on the
    same inputs; returns both sets of (out, grads, running stats)."""
    x, r, w, b, rm, rv = _case(target, shape, dtype, layout, residual, affine)
    results = []
    for use_ref in (False, True):
        conv = to64 if use_ref else (lambda t: clone_leaf(t, True) if t is not None else None)
        xs, rs, ws, bs = (conv(t.requires_grad_(True)) if t is not None else None for t in (x, r, w, b))
        rms, rvs = (t.detach().to(torch.float64 if use_ref else t.dtype).clone() for t in (rm, rv))
        if use_ref:
            y = reference.bn_act(xs, rms, rvs, ws, bs, training, 0.1, 1e-5, act, rs)
        else:
            with on(target):
                y = convkernels.ops.bn_act(xs, rms, rvs, ws, bs, training, 0.1, 1e-5, act, rs)
        g = make(shape, torch.float64, target.device, "nchw", seed=99).to(y.dtype)
        y.backward(g)
        grads = {n: t.grad for n, t in (("x", xs), ("residual", rs), ("weight", ws), ("bias", bs))
                 if t is not None}
        results.append((y, grads, rms, rvs))
    return results


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(target, dtype, layout, act, residual, training):
    requires(target, dtype)
    shape = (2, 3, 5, 7) if target.small else (4, 19, 9, 11)
    (y, grads, rm, rv), (y_ref, grads_ref, rm_ref, rv_ref) = _run_both(
        target, shape, dtype, layout, act, residual, training)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "out", "out")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name], dtype, "grad", f"grad {name}")
    assert_close(rm, rm_ref, dtype, "out", "running_mean")
    assert_close(rv, rv_ref, dtype, "out", "running_var")


SHAPES = [
    (1, 4, 3, 3),    # batch 1
    (3, 1, 4, 4),    # a single channel
    (2, 13, 5, 3),   # C not a multiple of any vector width, odd H and W
    (1, 8, 1, 1),    # one value per channel: eval only
    (5, 3, 1, 2),
]


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_shapes(target, shape, layout, affine):
    for training in (True, False):
        if training and shape[0] * shape[2] * shape[3] == 1:
            continue
        (y, grads, rm, rv), (y_ref, grads_ref, rm_ref, rv_ref) = _run_both(
            target, shape, torch.float32, layout, "relu", True, training, affine)
        assert_close(y, y_ref, torch.float32, "out", "out")
        for name in grads_ref:
            assert_close(grads[name], grads_ref[name], torch.float32, "grad", f"grad {name}")
        assert_close(rv, rv_ref, torch.float32, "out", "running_var")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_channel_slice_input(target, fmt):
    """A channel slice of a larger buffer (a dense-block prefix) is a valid input."""
    buf = make((2, 9, 4, 5), torch.float32, target.device, seed=3).contiguous(memory_format=fmt)
    x = buf[:, 2:7]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(5, device=target.device), torch.ones(5, device=target.device)
    with on(target):
        y = convkernels.ops.bn_act(x, rm, rv, None, None, True, 0.1, 1e-5, "relu")
        mean, var = convkernels.ops.batch_stats(x)
    y_ref = reference.bn_act(x.double(), None, None, training=True, act="relu")
    assert_close(y, y_ref, torch.float32, "out", "out")
    assert_close(var, x.double().var(dim=(0, 2, 3), unbiased=False), torch.float32, "out", "var")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_running_stats_over_steps(target):
    """Several training steps with fresh batches, then eval, as nn.BatchNorm2d does."""
    shape = (3, 5, 4, 6)
    rm, rv = torch.zeros(5, device=target.device), torch.ones(5, device=target.device)
    rm_ref, rv_ref = rm.double(), rv.double()
    for step in range(4):
        x = make(shape, torch.float32, target.device, seed=step, offset=step)
        with on(target):
            convkernels.ops.bn_act(x, rm, rv, None, None, True, 0.3, 1e-5, "relu")
        reference.bn_act(x.double(), rm_ref, rv_ref, None, None, True, 0.3, 1e-5, "relu")
    assert_close(rm, rm_ref, torch.float32, "out", "running_mean")
    assert_close(rv, rv_ref, torch.float32, "out", "running_var")
    x = make(shape, torch.float32, target.device, seed=9)
    with on(target):
        y = convkernels.ops.bn_act(x, rm, rv, None, None, False, 0.3, 1e-5, "relu")
    assert_close(y, reference.bn_act(x.double(), rm_ref, rv_ref, act="relu"), torch.float32, "out", "out")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_large_mean_is_stable(target):
    """Variance of data far from zero (mean/std = 1e3) must not cancel."""
    x = make((4, 3, 6, 6), torch.float32, target.device, offset=1000.0)
    rm, rv = torch.zeros(3, device=target.device), torch.ones(3, device=target.device)
    with on(target):
        y = convkernels.ops.bn_act(x, rm, rv, None, None, True, 1.0, 1e-5, "identity")
    y_ref = reference.bn_act(x.double(), None, None, training=True, act="identity")
    assert_close(y, y_ref, torch.float32, "grad", "out")
    assert_close(rv, x.double().var(dim=(0, 2, 3)), torch.float32, "grad", "running_var")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_saves_only_input_and_channel_stats(target, residual):
    """Backward keeps x (and residual), weight, bias and O(C) statistics: no
    normalised tensor, no activation mask."""
    shape = (2, 4, 6, 6)
    x, r, w, b, rm, rv = _case(target, shape, torch.float32, "nchw", residual)
    x.requires_grad_(True)
    w.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), on(target):
        convkernels.ops.bn_act(x, rm, rv, w, b, True, 0.1, 1e-5, "relu", r)
    big = [t for t in saved if t.numel() > 4 * shape[1]]
    assert len(big) == (2 if residual else 1), [tuple(t.shape) for t in saved]
    assert sum(t.numel() for t in saved if t.numel() <= 4 * shape[1]) <= 4 * shape[1]


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_gradcheck_float64(target):
    requires(target, torch.float64)
    if target.device != "cpu":
        pytest.skip("gradcheck runs on CPU")
    # The interpreter runs each of gradcheck's many forwards slowly: one smooth act there.
    shape, acts = ((2, 2, 2, 3), ("silu",)) if target.small else ((2, 3, 3, 4), ACTS)
    x, r, w, b, rm, rv = _case(target, shape, torch.float64, "nchw", True)
    args = [t.requires_grad_(True) for t in (x, w, b, r)]
    for training in (True, False):
        for act in acts:
            def f(x, w, b, r):
                with on(target):
                    return convkernels.ops.bn_act(x, rm.clone(), rv.clone(), w, b, training, 0.1,
                                                  1e-5, act, r)
            assert torch.autograd.gradcheck(f, args), (training, act)
