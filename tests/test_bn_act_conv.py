"""bn_act_conv (pre-activation conv) on every backend against the aten reference."""
import pytest
import torch

import convkernels
from convkernels.ops import reference
from convkernels.ops._checks import conv_output_size

from conv_configs import BY_NAME, CONFIGS, GRADCHECK, IDS
from harness import (TARGET_IDS, TARGETS, assert_close, check_against_reference, make, on, requires,
                     vector)

GRAD_NAMES = ("x", "bn_weight", "bn_bias", "conv_weight", "conv_bias")


def _inputs(target, cfg, dtype, layout, conv_bias=False, seed=0):
    dev = target.device
    cfg = cfg.scaled(target.small)
    x = make((cfg.batch, cfg.cin, *cfg.hw), dtype, dev, layout, seed, offset=0.2)
    w = make((cfg.cout, cfg.cin // cfg.groups, cfg.k, cfg.k), dtype, dev, "nchw", seed + 1)
    w = w / (cfg.cin // cfg.groups * cfg.k * cfg.k) ** 0.5
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return cfg, dict(
        x=x, running_mean=vector(cfg.cin, pdt, dev, seed + 5, -0.2, 0.2),
        running_var=vector(cfg.cin, pdt, dev, seed + 6, 0.5, 2), bn_weight=vector(cfg.cin, pdt, dev, seed + 3),
        bn_bias=vector(cfg.cin, pdt, dev, seed + 4, -0.5, 0.5), conv_weight=w,
        conv_bias=vector(cfg.cout, dtype, dev, seed + 2, -0.3, 0.3) if conv_bias else None)


def _call(fn, cfg, t, training, act, **kw):
    return fn(t["x"], t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], training,
              0.1, 1e-5, act, t["conv_weight"], t["conv_bias"], cfg.stride, cfg.padding,
              cfg.dilation, cfg.groups, **kw)


def _compare(target, cfg, tensors, dtype, training, act, with_grad, stats=False):
    def ours(t):
        kw = {"stats": convkernels.ops.batch_stats(t["x"])} if stats else {}
        return _call(convkernels.ops.bn_act_conv, cfg, t, training, act, **kw)

    check_against_reference(target, dtype, tensors, GRAD_NAMES, ours,
                            lambda t: _call(reference.bn_act_conv, cfg, t, training, act), with_grad)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval-grad", "eval-inference"])
def test_configs(target, cfg, mode):
    training, with_grad = mode == "train", mode != "eval-inference"
    for layout, conv_bias in (("nchw", False), ("channels_last", True)):
        cfg_s, t = _inputs(target, cfg, torch.float32, layout, conv_bias)
        _compare(target, cfg_s, t, torch.float32, training, "relu", with_grad)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("act", ("relu", "silu"))
def test_stats_passed_in(target, act):
    """Batch statistics computed once outside (the dense block's reuse) give the
    same outputs, gradients (through the statistics too) and running stats."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "channels_last")
    _compare(target, cfg, t, torch.float32, True, act, True, stats=True)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("act", ("relu", "identity", "silu", "sigmoid"))
def test_low_precision_and_acts(target, dtype, act):
    requires(target, dtype)
    cfg, t = _inputs(target, BY_NAME["3x3"], dtype, "channels_last")
    _compare(target, cfg, t, dtype, True, act, True)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_padding_stays_zero(target):
    """With a BN shift that maps 0 to a positive value, the padded border must
    still contribute 0 (padding is applied after the transform, as in torch)."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "nchw")
    t["bn_bias"] = torch.full_like(t["bn_bias"], 3.0)
    _compare(target, cfg, t, torch.float32, False, "relu", False)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_backward_saves_no_activation(target):
    """Backward keeps x, O(C) statistics and the weights, not act(bn(x))."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "nchw")
    t["x"].requires_grad_(True)
    t["conv_weight"].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s), on(target):
        _call(convkernels.ops.bn_act_conv, cfg, t, True, "relu")
    # x is saved by batch_stats and by the conv: the same storage, kept once.
    x_sized = {s.data_ptr() for s in saved if s.shape == t["x"].shape}
    assert x_sized == {t["x"].data_ptr()}, [tuple(s.shape) for s in saved]


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("mode", ["train", "eval-inference"])
def test_out_is_a_channel_slice(target, mode):
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "channels_last")
    oh, ow = conv_output_size("t", t["x"], t["conv_weight"], (1, 1), (1, 1), (1, 1))
    buf = torch.full((cfg.batch, cfg.cout + 5, oh, ow), -7.0, device=target.device).contiguous(
        memory_format=torch.channels_last)
    view = buf[:, 5:]
    ref_t = {k: (v.clone() if v is not None else None) for k, v in t.items()}
    with on(target), torch.no_grad():
        y = _call(convkernels.ops.bn_act_conv, cfg, t, mode == "train", "relu", out=view)
    assert y.data_ptr() == view.data_ptr()
    expected = _call(reference.bn_act_conv, cfg, ref_t, mode == "train", "relu")
    assert_close(view, expected.double(), torch.float32, "grad", "out slice")
    assert torch.all(buf[:, :5] == -7)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_gradcheck_float64(target):
    if target.device != "cpu":
        pytest.skip("gradcheck runs on CPU")
    cfg, t = _inputs(target, GRADCHECK, torch.float64, "nchw", True)
    args = [t[n].requires_grad_(True) for n in GRAD_NAMES]
    for training in (True, False):
        def f(x, bw, bb, w, cb):
            with on(target):
                return convkernels.ops.bn_act_conv(
                    x, t["running_mean"].clone(), t["running_var"].clone(), bw, bb, training, 0.1,
                    1e-5, "silu", w, cb, cfg.stride, cfg.padding, 1, 1)
        # Interpreted Triton: gradcheck's fast mode (random projections) keeps it short.
        assert torch.autograd.gradcheck(f, args, fast_mode=target.small), training


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_backward_folds_batch_statistics(target):
    """bn_act_conv_backward with batch_stats=True (the dense block's norm2): the
    gradients of training BN -> act -> conv, with the path through x's own
    batch statistics inside grad_x."""
    cfg, t = _inputs(target, BY_NAME["3x3"], torch.float32, "channels_last")
    x = t["x"]
    mean, var = convkernels.ops.batch_stats(x)
    ref = {k: (v.detach().double().requires_grad_(k in GRAD_NAMES[:4]) if v is not None else None)
           for k, v in t.items()}
    y = _call(reference.bn_act_conv, cfg, ref, True, "relu")
    g = torch.randn_like(y)
    y.backward(g)
    conv = [[v, v] if isinstance(v, int) else list(v)
            for v in (cfg.stride, cfg.padding, cfg.dilation)]

    def backward(mask):
        with on(target):
            return torch.ops.convkernels.bn_act_conv_backward(
                g.to(x.dtype), x, mean, var, t["bn_weight"], t["bn_bias"], 1e-5, "relu",
                t["conv_weight"], *conv, cfg.groups, False, True, mask, target.backend)

    grads = backward([True, False, False, True, True, True, False])
    for name, ours in zip(GRAD_NAMES[:4], grads):
        assert_close(ours, ref[name].grad, torch.float32, "grad", name)
    with pytest.raises(ValueError, match="batch_stats"):
        backward([True] * 3 + [False] * 4)
