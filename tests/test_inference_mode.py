"""Eval forwards under ``torch.inference_mode()``: every op, module and model,
also one built inside inference mode; later forwards with autograd or under
no_grad still work and give the same numbers, and no cache entry holds an
inference tensor (the derived-weight cache, ops/_fold.py, and the prepared
calls, fuse/_prepared.py)."""
import pytest
import torch

import convkernels
from convkernels import backend, models, nn as cnn
from convkernels.fuse import _prepared
from convkernels.ops import _fold

from harness import TARGET_IDS, TARGETS, Target, assert_close, make, on, randomise_state, vector

LAYOUTS = ("nchw", "channels_last")
# A DenseNet small enough for the Triton interpreter.
SMALL_DENSENET = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                      num_classes=5)


class _AddAct(torch.nn.Module):
    """add_act as a module (the op has no parameters)."""

    def forward(self, x):
        return convkernels.ops.add_act(x, x.flip(0), act="silu",
                                       scale=torch.full((x.size(0),), 0.5))


class _ConvWithResidual(cnn.ConvBNAct2d):
    def forward(self, x):
        return super().forward(x, residual=x)


def _randomised(m):
    randomise_state(m)
    return m


# name -> (builder, input shape, whether the Triton interpreter runs it in time).
# The models keep their own init (randomise_state's values overflow 121 layers).
MODULES = {
    "bn_act": (lambda: _randomised(cnn.BatchNormAct2d(4, act="relu")), (2, 4, 5, 6), True),
    "add_act": (_AddAct, (2, 4, 5, 6), True),
    "conv_bn_act": (lambda: _randomised(cnn.ConvBNAct2d(4, 6, 3, padding=1, act="relu")),
                    (2, 4, 6, 5), True),
    "conv_bn_act-residual": (lambda: _randomised(_ConvWithResidual(4, 4, 3, padding=1)),
                             (2, 4, 6, 5), True),
    "conv_bn_act-1x1": (lambda: _randomised(cnn.ConvBNAct2d(4, 6, 1, act="silu")),
                        (1, 4, 28, 28), False),
    "bn_act_conv": (lambda: _randomised(cnn.BNActConv2d(4, 6, 3, padding=1, act="relu")),
                    (2, 4, 6, 5), True),
    # 16x16: 4x4 maps in the first block, 2x2 in the second (eval only: no BN
    # statistics over too few values), fewer Triton-interpreter programs than 32x32
    "densenet-small": (lambda: models.DenseNet(**SMALL_DENSENET), (2, 3, 16, 16), True),
    "densenet121": (lambda: models.densenet121(num_classes=10), (1, 3, 32, 32), False),
    # The fused parts' prepared calls (fuse/_prepared.py) with a residual join.
    "resnet18": (lambda: models.resnet18(num_classes=10), (1, 3, 32, 32), False),
    "optimized-1x1": (lambda: convkernels.optimize(_randomised(torch.nn.Sequential(
        torch.nn.Conv2d(4, 6, 1), torch.nn.BatchNorm2d(6), torch.nn.SiLU()))), (1, 4, 28, 28),
        False),  # its prepared call is the GEMM's, with its own epilogue vectors
}


def _cached_tensors():
    def walk(v):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            for u in v:
                yield from walk(u)

    derived = [value for _, _, value in _fold.FOLD_CACHE._entries.values()]
    # A prepared call holds its weights in its closure.
    plans = [[c.cell_contents for c in plan.__closure__] for *_, plan in _prepared._PLANS.values()]
    return [t for value in derived + plans for t in walk(value)]


def _build(name, target, layout):
    builder, shape, small_ok = MODULES[name]
    if target.small and not small_ok:
        pytest.skip("too large for the Triton interpreter")
    torch.manual_seed(0)
    m = builder().to(target.device)
    x = make(shape, torch.float32, target.device, layout)
    return m.eval(), x


def _reference(m, x):
    with convkernels.use_backend("reference"), torch.no_grad():
        return m(x)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", MODULES)
def test_inference_mode_then_no_grad_and_grad(target, layout, name):
    m, x = _build(name, target, layout)
    convkernels.clear_caches()  # the first derived weights are made under inference mode
    with on(target):
        with torch.inference_mode():
            y = m(x)
        assert y.is_inference()
        assert not any(t.is_inference() for t in _cached_tensors())
        with torch.no_grad():
            y_no_grad = m(x)
        with torch.inference_mode():
            y_again = m(x)
        y_grad = m(x.detach().requires_grad_())
        y_grad.square().sum().backward()
    assert torch.equal(y_no_grad, y) and torch.equal(y_again, y)
    assert_close(y_grad.detach(), y, torch.float32, "grad", "with autograd")
    assert_close(y, _reference(m, x), torch.float32, "grad", "against the reference")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", MODULES)
def test_model_built_inside_inference_mode(target, layout, name):
    """Parameters that are inference tensors have no version counter: nothing
    derived from them is cached, so an in-place change is seen at once."""
    convkernels.clear_caches()
    with torch.inference_mode():
        m, x = _build(name, target, layout)
        with on(target):
            y = m(x)
            for p in m.parameters():
                p.mul_(0.5)
            y_changed = m(x)
        expected = _reference(m, x)
        assert not any(t.is_inference() for t in _cached_tensors())
    assert_close(y_changed, expected, torch.float32, "grad", "after an in-place change")
    if list(m.parameters()):
        assert not torch.equal(y, y_changed)
    with on(target), torch.no_grad():  # outside inference mode, on its inference tensors
        assert torch.equal(m(x), y_changed)


@pytest.mark.skipif(not backend.available("cpu", "cpu"), reason="convkernels._C not built")
def test_autocast_casts_under_inference_mode():
    """Autocast's cached casts of the parameters (ops/_autocast.py)."""
    m, x = _build("conv_bn_act", Target("cpu", "cpu", False), "channels_last")
    convkernels.clear_caches()
    with torch.autocast("cpu", torch.bfloat16):
        with torch.inference_mode():
            y = m(x)
        assert not any(t.is_inference() for t in _cached_tensors())
        with torch.no_grad():
            assert torch.equal(m(x), y)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_custom_ops_under_inference_mode(target):
    """The ops as torch.ops.convkernels.*, on inference-tensor and normal inputs."""
    dev = target.device

    def args():
        x = make((2, 4, 5, 6), torch.float32, dev, "channels_last")
        w, b, rm = (vector(4, torch.float32, dev, s, -0.5, 0.5) for s in (1, 2, 3))
        rv = vector(4, torch.float32, dev, 4)
        cw = make((4, 4, 3, 3), torch.float32, dev, seed=5)
        return x, w, b, rm, rv, cw

    def run(x, w, b, rm, rv, cw):
        ops = torch.ops.convkernels
        return [ops.bn_act(x, rm, rv, w, b, False, 0.1, 1e-5, "relu", x),
                ops.add_act(x, x, "sigmoid", None),
                ops.conv_bn_act(x, cw, None, rm, rv, w, b, False, 0.1, 1e-5, [1, 1], [1, 1],
                                [1, 1], 1, "relu", x),
                ops.bn_act_conv(x, rm, rv, w, b, False, 0.1, 1e-5, "silu", cw, None, [1, 1],
                                [0, 0], [1, 1], 1),
                *ops.batch_stats(x, backend.resolve(x.device))]

    normal = args()
    with on(target), torch.no_grad():
        expected = run(*normal)
    with torch.inference_mode():
        inference = args()
        with on(target):
            got_inference = run(*inference)
            got_normal = run(*normal)
    for e, a, b in zip(expected, got_inference, got_normal):
        assert torch.equal(a, e) and torch.equal(b, e)
