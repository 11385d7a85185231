"""python -m convkernels verify: the table and the exit status."""
import subprocess
import sys

import torch
import torchvision

from convkernels import verify


def test_verify_resnet18_passes():
    # 64: at 32 resnet18's last stage is 1x1 and BN there normalises 2 values
    # per channel (ill conditioned in fp32 training).
    r = subprocess.run([sys.executable, "-m", "convkernels", "verify", "--models", "resnet18",
                        "--size", "64"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    head, row = r.stdout.strip().splitlines()
    assert head.split() == ["model", "parameters", "eval", "error", "train", "error",
                            "gradient", "error", "verdict"]
    cells = row.split()
    assert cells[0] == "resnet18" and cells[-1] == "ok"
    assert cells[1] == f"{sum(p.numel() for p in torchvision.models.resnet18().parameters()):,}"


def test_a_wrong_builder_fails(monkeypatch):
    """Our builder replaced by one that computes something else: non-zero exit."""
    def wrong(**kwargs):
        model = torchvision.models.resnet18(**kwargs)
        model.layer1[0].relu = torch.nn.Sigmoid()  # not torchvision's computation
        return model
    monkeypatch.setattr(verify, "builders",
                        lambda name: (wrong, torchvision.models.get_model_builder(name)))
    rows, status = verify.run(["resnet18"], "cpu", "fp32", ("eval",), 32)
    assert status == 1 and not rows[0].ok
    assert "FAIL" in verify.table(rows)


def test_unknown_model_is_an_error():
    from convkernels.cli import main
    assert main(["verify", "--models", "no_such_model"]) == 2


def test_seed_models_are_verified_against_their_own_modules():
    """A seed model's reference is its plain-torch modules (unoptimized): the
    check fails if the fused forward computes something else."""
    from convkernels import verify

    assert {"lenet", "lenet_bn", "preact_resnet18", "regnetx32"} <= set(verify.model_names())
    rows, status = verify.run(["lenet_bn", "regnetx32"], "cpu", "fp32", ("eval", "train"), 28)
    assert status == 0 and all(r.ok for r in rows), rows
