"""The seed architectures torchvision lacks (convkernels.models.lenet, lenet_bn,
nin, preact_resnet*, highway_net, anynet / regnetx32, simclr) against the
plain-torch references in tests/reference, written from the seeds, on the
same weights (BN running statistics randomised) and inputs. Op counters prove
the fused path ran; hooks on inner modules fire with the reference's tensors.
"""
import copy
from functools import partial

import pytest
import torch
from torch import nn

import convkernels
from convkernels import models, ops
from model_cases import SEED_CASES, SMALL_NIN, ModelCase
from model_checks import (assert_grads_and_buffers_match, one_thread,  # noqa: F401
                          randomise_bn, rel)
from reference import nin as ref_nin
from reference import preact_resnet as ref_preact
from reference import simclr as ref_simclr

OPS = ("conv_bn_act", "bn_act", "bn_act_conv", "add_act", "conv_act", "highway_gate")
SEEDS = {c.name: c for c in SEED_CASES}
SEEDS["nin_bn"] = ModelCase("nin_bn", partial(models.nin, **SMALL_NIN, batch_norm=True),
                            partial(ref_nin.NiN, **SMALL_NIN, batch_norm=True), (1, 28, 28))
SEEDS["preact_resnet18_sd"] = ModelCase(
    "preact_resnet18_sd", partial(models.preact_resnet18, 3, 10, 0.5, width=8),
    partial(ref_preact.preact_resnet, 18, num_classes=10, width=8, p=0.5), (3, 32, 32))

# name: (fused op calls per train forward, the module a hook goes on)
CASES = {
    "lenet": ({"conv_act": 2}, "net.3"),
    "lenet_bn": ({"conv_bn_act": 2, "bn_act": 2}, "net.10.bn"),
    "nin": ({"conv_act": 12}, "net.2.2"),
    "nin_bn": ({"conv_bn_act": 12}, "net.2.3"),
    # 16 BN -> ReLU -> conv units; the first of stages 2-4 shares its BN -> ReLU
    # with the projection (bn_act), the final BN -> ReLU is one more bn_act.
    "preact_resnet18": ({"bn_act_conv": 13, "bn_act": 4}, "layer2.1.conv1"),
    "preact_resnet18_sd": ({"bn_act_conv": 13, "bn_act": 4, "add_act": 8}, "layer3.0.downsample"),
    "preact_resnet34": ({"bn_act_conv": 29, "bn_act": 4, "add_act": 16}, "layer2.1.conv1"),
    "preact_resnet50": ({"bn_act_conv": 44, "bn_act": 5, "add_act": 16}, "layer1.0.conv3"),
    "highway_net": ({"conv_bn_act": 4, "highway_gate": 3}, "layers.1.transform.0"),
    "anynet": ({"conv_bn_act": 1 + 3 * 3 + 2}, "net.stage2.0.conv4"),
    "regnetx32": ({"conv_bn_act": 1 + 10 * 3 + 2}, "net.stage2.3.conv3"),
    "simclr": ({"bn_act_conv": 13, "bn_act": 4}, "encoder.layer1.0.conv2"),
}


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused ops the fused forwards call."""
    counts = dict.fromkeys(OPS, 0)
    for name in OPS:
        def counted(*args, _op=getattr(ops, name), _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    return counts


_BASE = {}


def pair(name: str, dtype=torch.float32):
    """(reference, built): the builder's weights loaded strictly into the reference."""
    if name not in _BASE:
        torch.manual_seed(0)
        _BASE[name] = randomise_bn(SEEDS[name].ours())
    built = copy.deepcopy(_BASE[name]).to(dtype)
    ref = SEEDS[name].reference().to(dtype)
    ref.load_state_dict(built.state_dict(), strict=True)
    return ref, built


def inputs(name: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, *SEEDS[name].sample, generator=g, dtype=dtype)


def seeded(model, x):
    torch.manual_seed(3)  # dropout and stochastic depth masks
    return model(x)


def expected(name: str, training: bool) -> dict:
    counts = dict.fromkeys(OPS, 0)
    counts.update(CASES[name][0])
    if not training:
        counts["add_act"] = 0  # stochastic depth is the identity in eval
    return counts


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_eval_and_train_outputs(name, calls):
    ref, built = pair(name)
    x = inputs(name)
    ref.eval(), built.eval()
    with torch.no_grad():
        assert rel(built(x), ref(x)) < 1e-4
    assert calls == expected(name, False)
    assert rel(built(x), ref(x)) < 1e-4  # eval with autograd
    ref.train(), built.train()
    assert rel(seeded(built, x), seeded(ref, x)) < 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_float64_train_step(name, calls):
    ref, built = pair(name, torch.float64)
    x = inputs(name, torch.float64)
    results = []
    with convkernels.use_backend("cpu"):
        for model in (built, ref):
            model.train()
            xi = x.clone().requires_grad_()
            y = seeded(model, xi)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
            (y * g).sum().backward()
            results.append((y, xi.grad))
            if model is built:
                assert calls == expected(name, True)
    (y_b, gx_b), (y_r, gx_r) = results
    assert rel(y_b, y_r) < 1e-6
    assert rel(gx_b, gx_r) < 1e-6
    assert_grads_and_buffers_match(built, ref)


@pytest.mark.parametrize("name", list(CASES))
def test_hook_on_an_inner_module_sees_the_references_tensors(name, calls):
    """The hooked module's part runs its modules; the hook sees, and changes,
    what it does in the reference, and the rest stays fused."""
    ref, built = pair(name)
    x = inputs(name)
    seen = {}
    for key, model in (("built", built), ("ref", ref)):
        record = seen[key] = []
        model.get_submodule(CASES[name][1]).register_forward_hook(
            lambda m, args, out, record=record: (record.append(out.detach().clone()), out * 2)[1])
    for training in (False, True):
        ref.train(training), built.train(training)
        with torch.no_grad():
            assert rel(seeded(built, x), seeded(ref, x)) < 1e-4
    assert len(seen["built"]) == len(seen["ref"]) == 2
    for a, b in zip(seen["built"], seen["ref"]):
        assert rel(a, b) < 1e-4
    assert 0 < sum(calls.values()) < 2 * sum(expected(name, True).values())


def test_lenet_parameter_count():
    assert sum(p.numel() for p in models.lenet().parameters()) == 61706


def test_models_without_batchnorm_fuse_conv_act():
    """Without BatchNorm each conv -> act is one conv_act (lenet's 2, every conv
    of nin's 4 blocks of 3); its linear -> sigmoid layers stay torch's."""
    for model, convs in ((models.lenet(), 2), (models.nin(**SMALL_NIN), 12)):
        report = convkernels.explain(model)
        assert len(report.fused) == convs
        assert all(p.op.startswith("conv_act(") for p in report.fused)


def test_dense_batchnorm_with_one_sample_raises_as_torch():
    _, built = pair("lenet_bn")
    built.train()
    x = inputs("lenet_bn")[:1]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        built(x)


def test_stochastic_depth_drops_branches_in_training_only():
    torch.manual_seed(0)
    plain, dropping = models.preact_resnet18(3, 10, width=8), models.preact_resnet18(3, 10, 1.0, width=8)
    dropping.load_state_dict(plain.state_dict())
    x = inputs("preact_resnet18")
    plain.eval(), dropping.eval()
    with torch.no_grad():
        assert torch.equal(dropping(x), plain(x))
    plain.train(), dropping.train()
    with torch.no_grad():
        assert rel(seeded(dropping, x), seeded(plain, x)) > 1e-3


def test_simclr_on_a_torchvision_encoder():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    built = randomise_bn(models.simclr("resnet18", 32))
    encoder = torchvision.models.resnet18()
    encoder.fc = nn.Identity()
    ref = ref_simclr.SimCLR(encoder, 512, 32)
    ref.load_state_dict(built.state_dict(), strict=True)
    x = inputs("simclr")
    ref.eval(), built.eval()
    with torch.no_grad():
        assert rel(built(x), ref(x)) < 1e-4


def test_explain_reports_the_batchnorm1d_parts_as_they_run():
    """lenet_bn's dense BatchNorm1d -> sigmoid parts run fused, and explain says
    so; a hook on one sends that one back to its modules, and explain says that."""
    model = convkernels.models.lenet_bn()
    bn1d = [p for p in convkernels.explain(model) if p.op.startswith("bn_act")]
    assert len(bn1d) == 2 and all(p.fused for p in bn1d)
    model.net[9].bn.register_forward_hook(lambda *args: None)
    left = convkernels.explain(model).left
    assert [p.covers for p in left] == [("net.9.bn", "net.9.act")]
    assert "has a forward hook" in left[0].reason
