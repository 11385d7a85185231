"""BN-activation layer shapes of ResNet-50 and DenseNet-121, derived from torchvision.

The models are built on the ``meta`` device and run once on a meta
``[N, 3, 224, 224]`` input with a forward hook on every BatchNorm2d, so no
memory is allocated and nothing is cached. Run as a script to print them.
"""
from __future__ import annotations

import functools

import torch

HEADLINE = (32, 256, 28, 28)

# Quick-mode picks (at batch 32): the headline plus a few large, common layers.
# (C, H, W) and the model they come from.
QUICK_CHW = [
    ((512, 28, 28), "resnet50"),      # layer2 block outputs (+ residual)
    ((1024, 14, 14), "resnet50"),     # layer3 block outputs (+ residual)
    ((128, 56, 56), "densenet121"),   # denseblock1 norm2 (bottleneck BN)
]


@functools.lru_cache(None)
def _model_bn_shapes(name: str, batch: int) -> tuple:
    """(shape, count) of every distinct BatchNorm2d input of ``name``, in first-seen order."""
    import torchvision

    ctor = {"resnet50": torchvision.models.resnet50,
            "densenet121": torchvision.models.densenet121}[name]
    with torch.device("meta"):
        model = ctor()
    model.eval()
    counts: dict = {}

    def hook(_mod, inputs):
        s = tuple(int(d) for d in inputs[0].shape)
        counts[s] = counts.get(s, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(torch.empty(batch, 3, 224, 224, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return tuple(counts.items())


def model_shapes(name: str, batch: int = 32) -> list:
    """Distinct BN input shapes ``[N, C, H, W]`` of ``name`` at ``batch``."""
    return [s for s, _ in _model_bn_shapes(name, batch)]


def bn_shapes(batch: int = 32, full: bool = False) -> list:
    """Shapes to benchmark, as dicts(shape, models, count).

    ``full``: every distinct shape of both models (plus the headline), sorted by size.
    Otherwise the headline and the quick picks (rescaled to ``batch``).
    """
    table: dict = {}
    for name in ("resnet50", "densenet121"):
        for s, n in _model_bn_shapes(name, batch):
            e = table.setdefault(s, {"shape": s, "models": [], "count": 0})
            e["models"].append(name)
            e["count"] += n
    head = (batch,) + HEADLINE[1:]
    if full:
        out = [table.get(head, {"shape": head, "models": ["headline"], "count": 0})]
        rest = sorted((e for s, e in table.items() if s != head),
                      key=lambda e: (-_numel(e["shape"]), e["shape"]))
        return out + rest
    out = [table.get(head, {"shape": head, "models": ["headline"], "count": 0})]
    for chw, model in QUICK_CHW:
        s = (batch,) + chw
        e = table.get(s)
        assert e is not None, f"{s} is not a BN shape of {model}: update QUICK_CHW"
        out.append(e)
    return out


def _numel(s) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def parse_shapes(spec: str) -> list:
    """'N,C,H,W;N,C,H,W' -> list of dicts as bn_shapes returns."""
    out = []
    for part in spec.replace(" ", "").split(";"):
        if part:
            s = tuple(int(v) for v in part.replace("x", ",").split(","))
            assert len(s) == 4, f"shape {part!r} is not N,C,H,W"
            out.append({"shape": s, "models": ["user"], "count": 0})
    return out


def select(args) -> list:
    """The shapes a bench script runs, from its --shapes / --full / --batch options."""
    if args.shapes:
        return parse_shapes(args.shapes)
    return bn_shapes(args.batch, args.full)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--full", action="store_true")
    a = ap.parse_args()
    for name in ("resnet50", "densenet121"):
        print(f"{name}: {len(model_shapes(name, a.batch))} distinct BN shapes")
    for e in bn_shapes(a.batch, a.full):
        print(f"{'x'.join(map(str, e['shape'])):>18}  x{e['count']:<3} {','.join(e['models'])}")
