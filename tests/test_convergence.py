"""Convergence on scikit-learn's bundled digits (8x8, upsampled): each model
trained with the fused ops and its plain-torch reference from the same
initial weights on the same batches with the same seed gives the same loss
curve, within the tolerance stated per model, and >= 95% test accuracy.

lenet and lenet_bn train in fp32, where their curves agree to ~1e-7. The
pre-activation ResNet trains in float64: in fp32 its two curves separate from
about step 20 (Adam turns rounding-level gradient differences, e.g. on
parameters whose exact gradient is ~0, into full-size steps, and the
trajectories diverge), so the comparison there would measure chaos, not the
fused computation; in float64 they agree to ~1e-11 over 300 steps.
"""
import sys
from pathlib import Path

import pytest
import torch

import convkernels
from convkernels import models, ops
from reference import lenet as ref_lenet
from reference import preact_resnet as ref_preact

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits  # noqa: E402  (examples/digits.py, shared with train_digits.py)
from model_checks import one_thread  # noqa: F401  (autouse fixture)

# name: (builder, reference, image size, dtype, steps, batch, loss tolerance, fused)
CASES = {
    "lenet": (models.lenet, ref_lenet.LeNet, 28, torch.float32, 300, 64, 1e-4, False),
    "lenet_bn": (models.lenet_bn, lambda: ref_lenet.LeNet(batch_norm=True), 28, torch.float32,
                 300, 64, 1e-4, True),
    "preact_resnet18": (lambda: models.preact_resnet18(1, 10, width=8),
                        lambda: ref_preact.preact_resnet(18, in_channels=1, num_classes=10,
                                                         width=8),
                        32, torch.float64, 300, 32, 1e-8, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_loss_curve_and_accuracy(name, monkeypatch):
    build, reference, size, dtype, steps, batch, tol, fused = CASES[name]
    x_train, y_train, x_test, y_test = digits.digits(size)
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    torch.manual_seed(0)
    model = build().to(dtype)
    ref = reference().to(dtype)
    ref.load_state_dict(model.state_dict(), strict=True)

    calls = []
    for op in ("conv_bn_act", "bn_act", "bn_act_conv", "add_act"):
        def counted(*args, _op=getattr(ops, op), **kwargs):
            calls.append(1)
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, op, counted)
    with convkernels.use_backend("cpu"):
        fused_losses = digits.train(model, x_train, y_train, steps, batch)
    assert bool(calls) == fused
    monkeypatch.undo()
    ref_losses = digits.train(ref, x_train, y_train, steps, batch)

    assert len(fused_losses) == len(ref_losses) == steps
    assert max(abs(a - b) for a, b in zip(fused_losses, ref_losses)) <= tol
    assert sum(ref_losses[-20:]) < 0.5 * sum(ref_losses[:20])  # it learned
    assert digits.accuracy(model, x_test, y_test) >= 0.95
    assert digits.accuracy(ref, x_test, y_test) >= 0.95
