"""Bad input raises a clear error naming the argument, and mutates nothing."""
import pytest
import torch

import convkernels
from convkernels.nn import BatchNormAct2d

from harness import TARGET_IDS, TARGETS, on

C = 4


def _args(device="cpu", **over):
    args = dict(x=torch.randn(2, C, 3, 3, device=device),
                running_mean=torch.zeros(C, device=device), running_var=torch.ones(C, device=device),
                weight=torch.ones(C, device=device), bias=torch.zeros(C, device=device),
                training=True, momentum=0.1, eps=1e-5, act="relu", residual=None)
    args.update(over)
    return args


BN_CASES = {
    "rank": (dict(x=torch.randn(2, C, 3)), ValueError, "x must be a 4-D"),
    "int dtype": (dict(x=torch.ones(2, C, 3, 3, dtype=torch.int64)), TypeError, "x must be float32"),
    "weight channels": (dict(weight=torch.ones(C + 1)), ValueError, "weight must have shape (4,)"),
    "bias channels": (dict(bias=torch.ones(C - 1)), ValueError, "bias must have shape (4,)"),
    "running_mean channels": (dict(running_mean=torch.zeros(3)), ValueError, "running_mean must have shape"),
    "running_var 2-D": (dict(running_var=torch.ones(C, 1)), ValueError, "running_var must have shape"),
    "weight dtype": (dict(weight=torch.ones(C, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    "residual shape": (dict(residual=torch.randn(2, C, 3, 4)), ValueError, "residual has shape"),
    "residual dtype": (dict(residual=torch.randn(2, C, 3, 3, dtype=torch.float64)), TypeError, "residual has dtype"),
    "one value per channel": (dict(x=torch.randn(1, C, 1, 1)), ValueError, "more than 1 value per channel"),
    "unknown act": (dict(act="gelu"), ValueError, "unknown act 'gelu'"),
    "only running_mean": (dict(running_var=None), ValueError, "running_mean and running_var must be given together"),
    "eval without stats": (dict(training=False, running_mean=None, running_var=None), ValueError,
                           "required when training=False"),
}


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("case", BN_CASES, ids=str)
def test_bn_act_rejects(target, case):
    over, exc, message = BN_CASES[case]
    args = _args(**over)
    args = {k: (v.to(target.device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    before = [t.clone() for t in (args["running_mean"], args["running_var"]) if t is not None]
    with on(target), pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        convkernels.ops.bn_act(**args)
    after = [t for t in (args["running_mean"], args["running_var"]) if t is not None]
    for a, b in zip(before, after):
        assert torch.equal(a, b), "running stats changed by a rejected call"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch():
    args = _args("cuda", weight=torch.ones(C))
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        convkernels.ops.bn_act(**args)
    with pytest.raises(ValueError, match="residual is on"):
        convkernels.ops.add_act(torch.randn(2, C, 3, 3, device="cuda"), torch.randn(2, C, 3, 3))


def test_device_mismatch_meta():
    """The device check without a GPU: a meta tensor is another device."""
    with pytest.raises(ValueError, match="running_mean is on meta but x is on cpu"):
        convkernels.ops.bn_act(**_args(running_mean=torch.zeros(C, device="meta")))


ADD_CASES = {
    "rank": (dict(x=torch.randn(2, C)), ValueError, "x must be a 4-D"),
    "residual shape": (dict(residual=torch.randn(2, C, 3, 1)), ValueError, "residual has shape"),
    "residual dtype": (dict(residual=torch.randn(2, C, 3, 3).half()), TypeError, "residual has dtype"),
    "scale size": (dict(scale=torch.ones(3)), ValueError, "scale must have shape"),
    "scale grad": (dict(scale=torch.ones(2, requires_grad=True)), ValueError, "must not require grad"),
    "unknown act": (dict(act="tanh"), ValueError, "unknown act 'tanh'"),
}


@pytest.mark.parametrize("case", ADD_CASES, ids=str)
def test_add_act_rejects(case):
    over, exc, message = ADD_CASES[case]
    args = dict(x=torch.randn(2, C, 3, 3), residual=torch.randn(2, C, 3, 3), act="relu", scale=None)
    args.update(over)
    with pytest.raises(exc, match=message):
        convkernels.ops.add_act(**args)


def test_module_rejects_without_mutation():
    m = BatchNormAct2d(C).train()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, C, 1, 1))
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, C, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by a rejected call"


def test_module_rejects_unknown_act():
    with pytest.raises(ValueError, match="unknown act 'swish'"):
        BatchNormAct2d(C, act="swish")


def _conv_args(**over):
    args = dict(x=torch.randn(2, 4, 6, 6), conv_weight=torch.randn(8, 4, 3, 3), conv_bias=None,
                running_mean=torch.zeros(8), running_var=torch.ones(8), bn_weight=torch.ones(8),
                bn_bias=torch.zeros(8), training=True, momentum=0.1, eps=1e-5, stride=1, padding=1,
                dilation=1, groups=1, act="relu", residual=None, out=None)
    args.update(over)
    return args


CONV_CASES = {
    "input channels": (dict(conv_weight=torch.randn(8, 3, 3, 3)), ValueError, "conv_weight expects 3 input channels"),
    "groups": (dict(groups=3), ValueError, "groups=3 must divide"),
    "kernel too large": (dict(conv_weight=torch.randn(8, 4, 9, 9)), ValueError, "larger than the padded input"),
    "weight dtype": (dict(conv_weight=torch.randn(8, 4, 3, 3).double()), TypeError, "conv_weight has dtype"),
    "weight device": (dict(conv_weight=torch.randn(8, 4, 3, 3, device="meta")), ValueError, "conv_weight is on meta"),
    "bn channels": (dict(bn_weight=torch.ones(4)), ValueError, "bn_weight must have shape"),
    "residual shape": (dict(residual=torch.randn(2, 8, 5, 6)), ValueError, "residual has shape"),
    "out shape": (dict(out=torch.empty(2, 8, 6, 5)), ValueError, "out has shape"),
    "out dtype": (dict(out=torch.empty(2, 8, 6, 6, dtype=torch.float64)), TypeError, "out has dtype"),
    "stride": (dict(stride=0), ValueError, "stride and dilation must be >= 1"),
    "one value per channel": (dict(x=torch.randn(1, 4, 3, 3), stride=3), ValueError, "more than 1 value per channel"),
    "unknown act": (dict(act="elu"), ValueError, "unknown act 'elu'"),
}


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_bn_act_rejects(target, case):
    over, exc, message = CONV_CASES[case]
    args = {k: (v.to(target.device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in _conv_args(**over).items()}
    before = (args["running_mean"].clone(), args["running_var"].clone())
    with on(target), pytest.raises(exc, match=message):
        convkernels.ops.conv_bn_act(**args)
    assert torch.equal(before[0], args["running_mean"]) and torch.equal(before[1], args["running_var"])


@pytest.mark.parametrize("case", ["input channels", "kernel too large", "stats size"])
def test_bn_act_conv_rejects(case):
    x, w = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    kw = dict(training=True, conv_weight=w, padding=1)
    if case == "input channels":
        kw["conv_weight"], exc, msg = torch.randn(8, 5, 3, 3), ValueError, "conv_weight expects 5 input channels"
    elif case == "kernel too large":
        kw["conv_weight"], kw["padding"], exc, msg = torch.randn(8, 4, 7, 7), 0, ValueError, "larger than the padded"
    else:
        kw["stats"], exc, msg = (torch.zeros(3), torch.ones(3)), ValueError, "stats mean must have shape"
    with pytest.raises(exc, match=msg):
        convkernels.ops.bn_act_conv(x, rm, rv, None, None, **kw)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))
