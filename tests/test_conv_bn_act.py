"""conv_bn_act on every backend against the aten reference."""
import pytest
import torch

import convkernels
from convkernels.ops import _gemm1x1, reference
from convkernels.ops._checks import conv_output_size

from conv_configs import BY_NAME, CONFIGS, CPU_1X1, GRADCHECK, IDS
from harness import (TARGET_IDS, TARGETS, Target, assert_close, check_against_reference, make, on,
                     requires, vector)

ACTS = ("relu", "identity", "silu", "sigmoid")


def _inputs(target, cfg, dtype, layout, residual, conv_bias=False, seed=0):
    dev = target.device
    cfg = cfg.scaled(target.small)
    x = make((cfg.batch, cfg.cin, *cfg.hw), dtype, dev, layout, seed)
    w = make((cfg.cout, cfg.cin // cfg.groups, cfg.k, cfg.k), dtype, dev, "nchw", seed + 1)
    w = w / (cfg.cin // cfg.groups * cfg.k * cfg.k) ** 0.5
    cb = vector(cfg.cout, dtype, dev, seed + 2, -0.3, 0.3) if conv_bias else None
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    bw, bb = vector(cfg.cout, pdt, dev, seed + 3), vector(cfg.cout, pdt, dev, seed + 4, -0.5, 0.5)
    rm, rv = vector(cfg.cout, pdt, dev, seed + 5, -0.2, 0.2), vector(cfg.cout, pdt, dev, seed + 6, 0.5, 2)
    s, p, d = cfg.stride, cfg.padding, cfg.dilation
    oh, ow = conv_output_size("test", x, w, (s, s), (p, p), (d, d))
    r = make((cfg.batch, cfg.cout, oh, ow), dtype, dev, layout, seed + 7) if residual else None
    return cfg, dict(x=x, conv_weight=w, conv_bias=cb, running_mean=rm, running_var=rv,
                     bn_weight=bw, bn_bias=bb, residual=r)


def _call(fn, cfg, t, training, act):
    return fn(t["x"], t["conv_weight"], t["conv_bias"], t["running_mean"], t["running_var"],
              t["bn_weight"], t["bn_bias"], training, 0.1, 1e-5, cfg.stride, cfg.padding,
              cfg.dilation, cfg.groups, act, t["residual"])


GRAD_NAMES = ("x", "conv_weight", "conv_bias", "bn_weight", "bn_bias", "residual")


def _compare(target, cfg, tensors, dtype, training, act, with_grad):
    check_against_reference(
        target, dtype, tensors, GRAD_NAMES,
        lambda t: _call(convkernels.ops.conv_bn_act, cfg, t, training, act),
        lambda t: _call(reference.conv_bn_act, cfg, t, training, act), with_grad)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval-grad", "eval-inference"])
def test_configs(target, cfg, mode):
    training, with_grad = mode == "train", mode != "eval-inference"
    for layout, residual, conv_bias in (("nchw", True, False), ("channels_last", False, True)):
        cfg_s, t = _inputs(target, cfg, torch.float32, layout, residual, conv_bias)
        _compare(target, cfg_s, t, torch.float32, training, "relu", with_grad)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", ["train", "eval-inference"])
def test_dtypes_and_acts(target, dtype, act, mode):
    requires(target, dtype)
    cfg = BY_NAME["3x3"]
    cfg_s, t = _inputs(target, cfg, dtype, "channels_last", True)
    # The conv output is rounded to dtype before BN, so relu's mask flips where
    # it is near 0 and relu gradients cannot match a float64 reference; they are
    # checked in fp32 (test_configs).
    with_grad = mode == "train" and (act != "relu" or dtype == torch.float32)
    _compare(target, cfg_s, t, dtype, mode == "train", act, with_grad)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("mode", ["train", "eval-inference"])
def test_out_is_a_channel_slice(target, mode):
    """out= writes into a channel slice of a larger buffer and nothing else."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "channels_last", False)
    n, cout = cfg.batch, cfg.cout
    buf = torch.full((n, cout + 7, *cfg.hw), 5.0, device=target.device).contiguous(
        memory_format=torch.channels_last)
    view = buf[:, 3:3 + cout]
    with on(target), torch.no_grad():
        y = convkernels.ops.conv_bn_act(**{k: v for k, v in t.items()}, training=mode == "train",
                                        stride=cfg.stride, padding=cfg.padding, act="relu",
                                        out=view)
    assert y.data_ptr() == view.data_ptr()
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    expected = reference.conv_bn_act(t["x"], t["conv_weight"], None, rm, rv, t["bn_weight"],
                                     t["bn_bias"], mode == "train", 0.1, 1e-5, 1, 1, 1, 1, "relu")
    assert_close(view, expected.double(), torch.float32, "grad", "out slice")
    assert torch.all(buf[:, :3] == 5) and torch.all(buf[:, 3 + cout:] == 5)


@pytest.mark.parametrize("case", CPU_1X1, ids=lambda c: c[0].name)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval-inference"])
def test_cpu_1x1_paths(case, layout, mode):
    """The cpu backend runs 1x1 convs as GEMMs or in aten/oneDNN by shape and
    layout (forward, backward and folded inference): each matches the
    reference, with a residual, and written into a channel slice."""
    if not convkernels.backend.available("cpu", "cpu"):
        pytest.skip("convkernels._C not built")
    target = Target("cpu", "cpu", small=False)
    cfg, t = _inputs(target, case[0], torch.float32, layout, True)
    x, w, s = t["x"], t["conv_weight"], (cfg.stride, cfg.stride)
    assert _gemm1x1.gemm_pays(x, w, s, (0, 0), 1) == case[1][layout]
    assert _gemm1x1.gemm_backward_pays(x, w, s, (0, 0), 1) == case[1][layout]
    _compare(target, cfg, t, torch.float32, mode == "train", "relu", mode == "train")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    buf = torch.full((cfg.batch, cfg.cout + 5, *t["residual"].shape[2:]), 5.0).contiguous(
        memory_format=fmt)
    view = buf[:, 2:2 + cfg.cout]
    with on(target), torch.no_grad():
        _call(lambda *a: convkernels.ops.conv_bn_act(*a, out=view), cfg, t, mode == "train",
              "relu")
    t64 = {k: v.double() for k, v in t.items() if v is not None}
    expected = _call(reference.conv_bn_act, cfg, {**t64, "conv_bias": None}, mode == "train",
                     "relu")
    assert_close(view, expected, torch.float32, "grad", "out slice")
    assert torch.all(buf[:, :2] == 5) and torch.all(buf[:, 2 + cfg.cout:] == 5)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_gradcheck_float64(target):
    if target.device != "cpu":
        pytest.skip("gradcheck runs on CPU")
    cfg, t = _inputs(target, GRADCHECK, torch.float64, "nchw", True, True)
    names = ("x", "conv_weight", "conv_bias", "bn_weight", "bn_bias", "residual")
    args = [t[n].requires_grad_(True) for n in names]
    for training in (True, False):
        def f(x, w, cb, bw, bb, r):
            with on(target):
                return convkernels.ops.conv_bn_act(
                    x, w, cb, t["running_mean"].clone(), t["running_var"].clone(), bw, bb,
                    training, 0.1, 1e-5, cfg.stride, cfg.padding, 1, 1, "silu", r)
        # Interpreted Triton: gradcheck's fast mode (random projections) keeps it short.
        assert torch.autograd.gradcheck(f, args, fast_mode=target.small), training
