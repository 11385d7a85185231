"""``python -m convkernels verify``: each convkernels builder against
torchvision's builder of the same name, on the same weights and input.

Per model: both built from one seed, BN running statistics and affine
parameters randomised (eval is then not the identity on BN), the weights copied
into ours; then fp32 (or bf16) outputs in eval and in training (the same RNG
state before each forward, so dropout draws the same masks), and a float64 train
step on the CPU (input gradient, every parameter gradient, every running
statistic afterwards). Errors are ``||a - b|| / ||b||``; tolerances as in
DESIGN.md's Verification. The models are every name in
``convkernels.models.__all__`` that torchvision also builds, and the seed
architectures torchvision lacks (``SEED_INPUTS``), whose reference is the same
model with its modules' own forwards (``convkernels.unoptimize``): the plain-
torch modules written from the seeds.
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

# Outputs per dtype, and float64 gradients / running statistics.
TOL = {"fp32": 1e-4, "bf16": 5e-2}
GRAD_TOL = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# inception_v3's aux head needs 299x299 inputs in training.
BUILD_KWARGS = {"inception_v3": {"aux_logits": False}, "simclr": {"encoder": "resnet18"}}
# The seed models: (input channels, smallest input size) of their defaults.
SEED_INPUTS = {"lenet": (1, 28), "lenet_bn": (1, 28), "nin": (1, 224), "highway_net": (1, 28),
               "regnetx32": (1, 64), "preact_resnet18": (3, 64), "preact_resnet34": (3, 64),
               "preact_resnet50": (3, 64), "preact_resnet101": (3, 64), "simclr": (3, 64)}


@dataclass
class Row:
    model: str
    params: int
    eval_err: Optional[float]
    train_err: Optional[float]
    grad_err: Optional[float]
    ok: bool
    note: str = ""


def model_names() -> list:
    """Every convkernels builder with a torchvision counterpart, then the seed models."""
    import torchvision

    import convkernels.models as ours

    tv = set(torchvision.models.list_models())
    return [n for n in ours.__all__ if n in tv] + list(SEED_INPUTS)


def builders(name: str) -> tuple:
    """(ours, the reference's) builder of ``name``."""
    import torchvision

    import convkernels
    import convkernels.models as ours

    build = getattr(ours, name)
    if name in SEED_INPUTS:
        return build, lambda **kwargs: convkernels.unoptimize(build(**kwargs))
    return build, torchvision.models.get_model_builder(name)


def _input(name: str, size: int) -> tuple:
    """(channels, size) of the input: at least the model's smallest."""
    if name in SEED_INPUTS:
        channels, least = SEED_INPUTS[name]
        return channels, max(size, least)
    import torchvision

    return 3, max(size, torchvision.models.get_model_weights(name).DEFAULT.meta["min_size"][0])


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)


def _outputs(y) -> list:
    return [t for t in (y if isinstance(y, (tuple, list)) else (y,)) if t is not None]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def _out_err(ys, refs) -> float:
    ys, refs = _outputs(ys), _outputs(refs)
    if len(ys) != len(refs):
        return float("inf")
    return max(_rel(y, r) for y, r in zip(ys, refs))


def _seeded(model, x):
    torch.manual_seed(3)
    return model(x)


def _grad_err(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> tuple:
    """(max error of a float64 train step on the CPU: input and parameter
    gradients, running statistics afterwards; torchvision's float64 train
    outputs)."""
    grads = []
    for m in (ours, ref):
        m.train()
        xi = x.clone().requires_grad_()
        ys = _outputs(_seeded(m, xi))
        loss = sum((y * torch.randn(y.shape, dtype=y.dtype,
                                    generator=torch.Generator().manual_seed(i))).sum()
                   for i, y in enumerate(ys))
        loss.backward()
        grads.append(xi.grad)
    errs = [_rel(*grads)]
    ref_params, ref_buffers = dict(ref.named_parameters()), dict(ref.named_buffers())
    errs += [_rel(p.grad, ref_params[n].grad) for n, p in ours.named_parameters()
             if p.grad is not None]
    errs += [_rel(b, ref_buffers[n]) for n, b in ours.named_buffers() if b.is_floating_point()]
    return max(errs), ys


def verify_model(name: str, device: str = "cpu", dtype: str = "fp32",
                 modes=("eval", "train"), size: int = 64) -> Row:
    build_ours, build_ref = builders(name)
    kwargs = BUILD_KWARGS.get(name, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init_weights notices
        torch.manual_seed(0)
        ref = build_ref(**kwargs)
        _randomise_bn(ref)
        torch.manual_seed(0)
        ours = build_ours(**kwargs)
    ours.load_state_dict(ref.state_dict())
    c, s = _input(name, size)
    x = torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(2))
    row = Row(name, sum(p.numel() for p in ref.parameters()), None, None, None, True)
    tol = TOL[dtype]
    if "train" in modes:  # float64 copies, before the train forwards below update stats
        row.grad_err, truth = _grad_err(copy.deepcopy(ours).double(),
                                        copy.deepcopy(ref).double(), x.double())
        row.ok &= row.grad_err <= GRAD_TOL
    ours, ref = ours.to(device, DTYPES[dtype]), ref.to(device, DTYPES[dtype])
    xd = x.to(device, DTYPES[dtype])
    if "eval" in modes:
        ours.eval(), ref.eval()
        with torch.no_grad():
            row.eval_err = _out_err(ours(xd), ref(xd))
        row.ok &= row.eval_err <= tol
    if "train" in modes:
        ours.train(), ref.train()
        with torch.no_grad():
            y, y_ref = _seeded(ours, xd), _seeded(ref, xd)
        row.train_err = _out_err(y, y_ref)
        if row.train_err > tol:
            # BN over a few values per channel (a 1x1 last stage, batch 2) is ill
            # conditioned: then ours must be as close to torchvision's float64
            # result as torchvision's own output is.
            own, ours_err = _out_err(y_ref, truth), _out_err(y, truth)
            row.note = f"ill-conditioned: torchvision fp32 vs float64 {own:.1e}"
            row.ok &= ours_err <= 2 * own + tol
    return row


class _Lines:
    """A one-line-per-model progress where tqdm is not installed."""

    def __init__(self, items, total):
        self.items, self.total = items, total

    def __iter__(self):
        for i, item in enumerate(self.items, 1):
            print(f"[{i}/{self.total}] {item}", file=sys.stderr, flush=True)
            yield item


def _progress(items: list):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(items, len(items))
    return tqdm(items, unit="model", file=sys.stderr)


def _fmt(e: Optional[float]) -> str:
    return "-" if e is None else f"{e:.1e}"


def table(rows: list) -> str:
    head = ("model", "parameters", "eval error", "train error", "gradient error", "verdict")
    body = [(r.model, f"{r.params:,}", _fmt(r.eval_err), _fmt(r.train_err), _fmt(r.grad_err),
             ("ok " if r.ok else "FAIL ") + r.note) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in (head, *body))


def run(models: list, device: str, dtype: str, modes: tuple, size: int,
        check: Callable = verify_model) -> tuple:
    """(rows, exit status): 1 where any model failed or raised."""
    rows = []
    bar = _progress(models)
    for name in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)
        try:
            rows.append(check(name, device, dtype, modes, size))
        except Exception as e:  # a failure of this model, reported in its row
            rows.append(Row(name, 0, None, None, None, False, f"{type(e).__name__}: {e}"[:80]))
    return rows, int(not all(r.ok for r in rows))
