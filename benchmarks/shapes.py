"""BN-activation and conv layer shapes of ResNet-50 and DenseNet-121, derived from torchvision.

The models are built on the ``meta`` device and run once on a meta
``[N, 3, 224, 224]`` input with forward hooks on every BatchNorm2d (and, for the
conv shapes, every Conv2d and ReLU), so no memory is allocated and nothing is
cached. Run as a script to print them.
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


def _run_meta(name: str, batch: int, types: tuple, hook, pre: bool = False):
    """Builds torchvision ``name`` on the meta device and runs it (eval, no_grad) on a
    meta ``[batch, 3, 224, 224]`` input with ``hook`` as forward (``pre``: forward-pre)
    hook on every module of ``types``. Returns the model."""
    import torchvision

    ctor = {"resnet50": torchvision.models.resnet50,
            "densenet121": torchvision.models.densenet121}[name]
    with torch.device("meta"):
        model = ctor()
    model.eval()
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(m, register)(hook) for m in model.modules() if isinstance(m, types)]
    try:
        with torch.no_grad():
            model(torch.empty(batch, 3, 224, 224, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return model


@functools.lru_cache(None)
def _model_bn_shapes(name: str, batch: int) -> tuple:
    """(shape, count) of every distinct BatchNorm2d input of ``name``, in first-seen order."""
    counts: dict = {}

    def hook(_mod, inputs):
        s = tuple(int(d) for d in inputs[0].shape)
        counts[s] = counts.get(s, 0) + 1

    _run_meta(name, batch, (torch.nn.BatchNorm2d,), hook, pre=True)
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


# ------------------------------------------------------------------ conv shapes
# A conv is described by ConvSpec (N, Cin, H, W, Cout, k, stride, padding, groups)
# plus its pattern: "conv_bn_act" (conv -> BN -> ReLU, the BN over Cout) or
# "bn_act_conv" (BN -> ReLU -> conv, the BN over Cin: DenseNet's pre-activation units).
CONV_PATTERNS = ("conv_bn_act", "bn_act_conv")

# Quick-mode picks: ((Cin, H, W, Cout, k, stride, padding, groups), pattern, model, role).
QUICK_CONVS = [
    ((3, 224, 224, 64, 7, 2, 3, 1), "conv_bn_act", "resnet50", "stem 7x7/2"),
    ((1024, 14, 14, 256, 1, 1, 0, 1), "conv_bn_act", "resnet50", "layer3 1x1 reduce"),
    ((128, 28, 28, 128, 3, 1, 1, 1), "conv_bn_act", "resnet50", "layer2 3x3 bottleneck"),
    ((128, 28, 28, 512, 1, 1, 0, 1), "conv_bn_act", "resnet50", "layer2 1x1 expand"),
    ((256, 28, 28, 256, 3, 2, 1, 1), "conv_bn_act", "resnet50", "layer3.0 3x3/2"),
    ((256, 28, 28, 128, 1, 1, 0, 1), "bn_act_conv", "densenet121", "denseblock2 1x1 (conv1)"),
    ((128, 56, 56, 32, 3, 1, 1, 1), "bn_act_conv", "densenet121", "denseblock1 3x3 (conv2)"),
]


def conv_flops(spec) -> int:
    """Forward FLOPs of one conv: 2 * N * Cout * OH * OW * Cin/groups * k * k."""
    n, cin, h, w, cout, k, stride, pad, groups = spec
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    return 2 * n * cout * oh * ow * (cin // groups) * k * k


def conv_spec_str(spec) -> str:
    """``32x256x28x28-256k3s2p1`` (``g<groups>`` appended when grouped)."""
    n, cin, h, w, cout, k, stride, pad, groups = spec
    return f"{n}x{cin}x{h}x{w}-{cout}k{k}s{stride}p{pad}" + (f"g{groups}" if groups != 1 else "")


@functools.lru_cache(None)
def _model_conv_shapes(name: str, batch: int) -> tuple:
    """((spec, pattern), count, first module name) of every distinct Conv2d of ``name``.

    Pattern: ResNet-50 convs are all followed by a BN: ``conv_bn_act``. DenseNet-121
    convs whose input is a BN output (directly or through a ReLU) are
    ``bn_act_conv``; the stem (conv0 -> norm0 -> relu0) is ``conv_bn_act``.
    """
    nn = torch.nn
    calls = []  # (module, input, output), in execution order

    def hook(mod, inputs, output):
        calls.append((mod, inputs[0], output))

    model = _run_meta(name, batch, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU), hook)
    names = {m: n for n, m in model.named_modules()}

    def producers(t):
        return [c for c in calls if c[2] is t]

    def from_bn(t) -> bool:  # t is a BN output, or a ReLU of one (in place or not)
        for mod, inp, _ in producers(t):
            if isinstance(mod, nn.BatchNorm2d):
                return True
            if isinstance(mod, nn.ReLU) and inp is not t and from_bn(inp):
                return True
        return False

    counts: dict = {}
    for mod, inp, out in calls:
        if not isinstance(mod, nn.Conv2d):
            continue
        followed_by_bn = any(isinstance(m, nn.BatchNorm2d) and i is out for m, i, _ in calls)
        if name == "densenet121" and from_bn(inp):
            pattern = "bn_act_conv"
        elif followed_by_bn:
            pattern = "conv_bn_act"
        else:
            continue  # no BN next to it (none in these two models)
        k, s, p = mod.kernel_size, mod.stride, mod.padding
        assert k[0] == k[1] and s[0] == s[1] and p[0] == p[1] and mod.dilation == (1, 1), mod
        spec = (int(inp.shape[0]), int(inp.shape[1]), int(inp.shape[2]), int(inp.shape[3]),
                mod.out_channels, k[0], s[0], p[0], mod.groups)
        key = (spec, pattern)
        if key in counts:
            counts[key][0] += 1
        else:
            counts[key] = [1, names[mod]]
    return tuple((key, c, n) for key, (c, n) in counts.items())


def conv_table(batch: int = 32) -> dict:
    """(spec, pattern) -> dict(spec, pattern, models, count, layer) over both models."""
    table: dict = {}
    for name in ("resnet50", "densenet121"):
        for key, n, layer in _model_conv_shapes(name, batch):
            e = table.setdefault(key, {"spec": key[0], "pattern": key[1], "models": [],
                                       "count": 0, "layer": f"{name}.{layer}"})
            e["models"].append(name)
            e["count"] += n
    return table


def conv_shapes(batch: int = 32, full: bool = False) -> list:
    """Conv shapes to benchmark at ``batch``, as dicts(spec, pattern, models, count, layer).

    ``full``: every distinct (shape, pattern) of both models, ResNet-50's first,
    each model's in first-seen order. Otherwise the QUICK_CONVS picks.
    """
    table = conv_table(batch)
    if full:
        return sorted(table.values(), key=lambda e: "resnet50" not in e["models"])
    out = []
    for chw, pattern, model, role in QUICK_CONVS:
        key = ((batch,) + chw, pattern)
        e = table.get(key)
        assert e is not None and model in e["models"], \
            f"{key} is not a conv of {model}: update QUICK_CONVS"
        out.append(dict(e, layer=f"{e['layer']} ({role})"))
    return out


def parse_conv_shapes(spec: str, batch: int) -> list:
    """'Cin,H,W,Cout,k,stride,padding[,groups][,pre];...' -> dicts as conv_shapes returns."""
    out = []
    for part in spec.replace(" ", "").split(";"):
        if not part:
            continue
        fields = part.split(",")
        pattern = "conv_bn_act"
        if fields[-1] in ("pre", "bn_act_conv"):
            pattern, fields = "bn_act_conv", fields[:-1]
        v = [int(f) for f in fields]
        assert len(v) in (7, 8), f"conv {part!r} is not Cin,H,W,Cout,k,stride,padding[,groups][,pre]"
        if len(v) == 7:
            v.append(1)
        out.append({"spec": (batch,) + tuple(v), "pattern": pattern, "models": ["user"],
                    "count": 0, "layer": "user"})
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
    for name in ("resnet50", "densenet121"):
        print(f"{name}: {len(_model_conv_shapes(name, a.batch))} distinct conv shapes")
    for e in conv_shapes(a.batch, a.full):
        print(f"{conv_spec_str(e['spec']):>26}  {e['pattern']:<11} x{e['count']:<3} "
              f"{conv_flops(e['spec']) / 1e9:7.2f} GFLOP  {','.join(e['models'])}  {e['layer']}")
