"""conv_bn_act benchmark: per-layer fused conv + BN + ReLU of ResNet-50 and DenseNet-121,
and conv + bias + ReLU of VGG-16 and AlexNet.

Three patterns, from the models' own layers (shapes.py, forward hooks on a meta model;
VGG-16's and AlexNet's from CONV_ACT_CONVS here):

* ``conv_bn_relu``: ``relu(batch_norm(conv2d(x)))`` -> ``convkernels.ops.conv_bn_act``
  (every ResNet-50 conv, DenseNet-121's stem);
* ``bn_relu_conv``: ``conv2d(relu(batch_norm(x)))`` -> ``convkernels.ops.bn_act_conv``
  (DenseNet-121's norm -> relu -> conv units, BN over the conv's input channels);
* ``conv_relu``: ``relu(conv2d(x, w, b))`` -> ``convkernels.ops.conv_act`` (every conv of
  VGG-16's and AlexNet's features; eager is F.conv2d + F.relu).

Variants: ``eager`` (F.conv2d / F.batch_norm / F.relu), ``compile`` (torch.compile of
that eager code; eval: of an nn.Module owning the parameters, called under no_grad
with ``torch._inductor.config.freezing = True``, so inductor may fold BN into the
conv and prepack weights), ``convkernels-<backend>`` (auto; on CUDA also triton and
cuda). No conv bias in conv_bn_relu / bn_relu_conv (as in ResNet-50 and DenseNet-121), a
conv bias in conv_relu (as in VGG and AlexNet).

Modes (``--conv-modes``): ``eval`` fwd under no_grad at ``--batch`` (32), ``eval1``
the same at batch 1, ``train`` fwd+bwd at ``--batch``: batch statistics, running
stats updated in place, autograd.grad w.r.t. x, conv weight, BN weight and bias with
a fixed grad_y (conv_relu: x, conv weight and bias). Quick (default): eval at batch 32
on QUICK_CONVS (5 ResNet-50 convs, 2 DenseNet units) and 3 conv_relu convs (AlexNet's
11x11/4 stem and a 13x13 3x3, VGG-16's 14x14 3x3); ``--full``: every distinct conv
shape, all three modes; ``--conv-models resnet50`` keeps one model's shapes.
Layout / dtype defaults: CPU fp32, nchw (``--full``: nchw and cl); CUDA bf16, cl.

FLOPs (TFLOP/s = flops / median): 2*N*Cout*OH*OW*Cin/groups*k*k per forward, x3
for fwd+bwd (BN / ReLU work ignored). At the end, the geometric-mean speedup of
each variant vs eager and vs compile over the ResNet-50 eval shapes measured is
printed and written as ``conv_bn_act_geomean`` rows.
"""
from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import shapes as shapes_mod  # noqa: E402
import timing  # noqa: E402

BENCH = "conv_bn_act"
SUMMARY_BENCH = "conv_bn_act_geomean"
EPS, MOMENTUM = 1e-5, 0.1
OP_NAMES = {"conv_bn_act": "conv_bn_relu", "bn_act_conv": "bn_relu_conv", "conv_act": "conv_relu"}
CONV_MODELS = ("resnet50", "densenet121", "vgg16", "alexnet")

# conv -> ReLU without BN (conv_act): every distinct conv of torchvision's vgg16 and
# alexnet features at 224x224, as (Cin, H, W, Cout, k, stride, padding, groups),
# model, first layer, count, in quick mode.
CONV_ACT_CONVS = [
    ((3, 224, 224, 64, 11, 4, 2, 1), "alexnet", "features.0", 1, True),
    ((64, 27, 27, 192, 5, 1, 2, 1), "alexnet", "features.3", 1, False),
    ((192, 13, 13, 384, 3, 1, 1, 1), "alexnet", "features.6", 1, False),
    ((384, 13, 13, 256, 3, 1, 1, 1), "alexnet", "features.8", 1, True),
    ((256, 13, 13, 256, 3, 1, 1, 1), "alexnet", "features.10", 1, False),
    ((3, 224, 224, 64, 3, 1, 1, 1), "vgg16", "features.0", 1, False),
    ((64, 224, 224, 64, 3, 1, 1, 1), "vgg16", "features.2", 1, False),
    ((64, 112, 112, 128, 3, 1, 1, 1), "vgg16", "features.5", 1, False),
    ((128, 112, 112, 128, 3, 1, 1, 1), "vgg16", "features.7", 1, False),
    ((128, 56, 56, 256, 3, 1, 1, 1), "vgg16", "features.10", 1, False),
    ((256, 56, 56, 256, 3, 1, 1, 1), "vgg16", "features.12", 2, False),
    ((256, 28, 28, 512, 3, 1, 1, 1), "vgg16", "features.17", 1, False),
    ((512, 28, 28, 512, 3, 1, 1, 1), "vgg16", "features.19", 2, False),
    ((512, 14, 14, 512, 3, 1, 1, 1), "vgg16", "features.24", 3, True),
]


def conv_act_shapes(batch: int, full: bool) -> list:
    """CONV_ACT_CONVS at ``batch`` as the entries shapes.conv_shapes returns."""
    return [{"spec": (batch,) + chw, "pattern": "conv_act", "models": [model], "count": count,
             "layer": f"{model}.{layer}"}
            for chw, model, layer, count, quick in CONV_ACT_CONVS if full or quick]


def parse_conv_shapes(spec: str, batch: int) -> list:
    """shapes.parse_conv_shapes, where a trailing ``act`` makes a conv -> ReLU (conv_act)."""
    out = []
    for part in filter(None, spec.replace(" ", "").split(";")):
        act = part.endswith(",act")
        for e in shapes_mod.parse_conv_shapes(part[:-4] if act else part, batch):
            out.append(dict(e, pattern="conv_act") if act else e)
    return out
# --conv-modes name -> (batch: None = --batch, mode, direction)
MODES = OrderedDict([("eval", (None, "eval", "fwd")), ("eval1", (1, "eval", "fwd")),
                     ("train", (None, "train", "fwd+bwd"))])


# ------------------------------------------------------------------- eager code
def conv_bn_relu(x, w, bn_w, bn_b, rm, rv, training, stride, padding, groups):
    z = F.conv2d(x, w, None, stride, padding, 1, groups)
    return F.relu(F.batch_norm(z, rm, rv, bn_w, bn_b, training, MOMENTUM, EPS))


def bn_relu_conv(x, w, bn_w, bn_b, rm, rv, training, stride, padding, groups):
    t = F.relu(F.batch_norm(x, rm, rv, bn_w, bn_b, training, MOMENTUM, EPS))
    return F.conv2d(t, w, None, stride, padding, 1, groups)


def conv_relu(x, w, b, stride, padding, groups):
    return F.relu(F.conv2d(x, w, b, stride, padding, 1, groups))


EAGER = {"conv_bn_act": conv_bn_relu, "bn_act_conv": bn_relu_conv, "conv_act": conv_relu}


def fused_call(pattern, x, *args):
    """The convkernels op of ``pattern`` on EAGER[pattern]'s arguments."""
    ops = common.ck.ops
    if pattern == "conv_act":
        w, b, stride, padding, groups = args
        return ops.conv_act(x, w, b, stride, padding, 1, groups, "relu")
    w, bn_w, bn_b, rm, rv, training, stride, padding, groups = args
    if pattern == "conv_bn_act":
        return ops.conv_bn_act(x, w, None, rm, rv, bn_w, bn_b, training, MOMENTUM, EPS, stride,
                               padding, 1, groups, "relu", None)
    return ops.bn_act_conv(x, rm, rv, bn_w, bn_b, training, MOMENTUM, EPS, "relu", w, None,
                           stride, padding, 1, groups)


# A ReLU input within this much of 0 (relative to the largest |input|) is a tie:
# fp32 rounding (~1e-6 relative here, eager's own error up to ~1e-5) may put it on
# either side.
TIE = 2e-5


def untie_relu(pattern, stride, padding, groups):
    """``Case.untie`` for a train case: on float64 inputs, takes every ReLU input
    within TIE of 0 out of play. conv_bn_relu: grad_y is zeroed there (the
    element's gradient no longer depends on the side); conv_relu likewise.
    bn_relu_conv: x is moved so that its BN output sits at +-2*TIE*max instead (the
    batch statistics move by O(TIE/count)). Returns how many inputs were ties."""
    def untie(inp: dict) -> int:
        with torch.no_grad():
            x = inp["x"]
            if pattern == "conv_act":
                z = F.conv2d(x, inp["conv_weight"], inp["conv_bias"], stride, padding, 1, groups)
            else:
                bn_w, bn_b = inp["bn_weight"], inp["bn_bias"]
                if pattern == "conv_bn_act":
                    x = F.conv2d(x, inp["conv_weight"], None, stride, padding, 1, groups)
                z = F.batch_norm(x, None, None, bn_w, bn_b, True, 0.0, EPS)
            lim = TIE * z.abs().max()
            tie = z.abs() < lim
            if pattern != "bn_act_conv":
                inp["grad_y"].masked_fill_(tie, 0.0)
            else:
                var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
                slope = (bn_w * (var + EPS).rsqrt()).view(1, -1, 1, 1)  # dz/dx, stats held
                away = torch.where(z >= 0, 2 * lim, -2 * lim)
                x.add_(torch.where(tie, (away - z) / slope, 0.0))
        return int(tie.sum())
    return untie


class EvalUnit(nn.Module):
    """The eager eval unit with its parameters and BN buffers in a module (what
    inductor freezing needs); ``fused`` runs convkernels on the same tensors."""

    def __init__(self, pattern, spec, base):
        super().__init__()
        self.pattern = pattern
        self.stride, self.padding, self.groups = spec[6], spec[7], spec[8]
        self.weight = nn.Parameter(base["conv_weight"])
        if pattern == "conv_act":
            self.bias = nn.Parameter(base["conv_bias"])
            return
        self.bn_weight = nn.Parameter(base["bn_weight"])
        self.bn_bias = nn.Parameter(base["bn_bias"])
        self.register_buffer("running_mean", base["running_mean"])
        self.register_buffer("running_var", base["running_var"])

    def _args(self):
        if self.pattern == "conv_act":
            return self.weight, self.bias, self.stride, self.padding, self.groups
        return (self.weight, self.bn_weight, self.bn_bias, self.running_mean, self.running_var,
                False, self.stride, self.padding, self.groups)

    def forward(self, x):
        return EAGER[self.pattern](x, *self._args())

    def fused(self, x):
        return fused_call(self.pattern, x, *self._args())


class FreezeOnCompile:
    """A torch.compile'd eval module whose compilation (its first call) runs with
    ``torch._inductor.config.freezing = True``; later calls reuse that code."""

    def __init__(self, module, mode):
        self.compiled = torch.compile(module, dynamic=False, mode=mode)
        self.compiled_once = False

    def __call__(self, inp):
        if not self.compiled_once:
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):
                y = self.compiled(inp["x"])
            self.compiled_once = True
            return y
        return self.compiled(inp["x"])


# ------------------------------------------------------------------------ cases
def make_base(entry, layout, dtype, device) -> dict:
    """Random tensors of one (conv, pattern, layout, dtype); cloned by train cases,
    owned (shared) by the eval module."""
    spec, pattern = entry
    n, cin, h, w, cout, k, stride, pad, groups = spec
    g = torch.Generator().manual_seed(2)
    pre = pattern == "bn_act_conv"
    c = cin if pre else cout  # BN channels
    x_scale, x_shift = (2.0, 0.5) if pre else (1.0, 0.0)
    fan_in = cin // groups * k * k
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    # BN sees x (pre) or the conv output (variance ~ x's variance, ~1, with this weight scale).
    mu, var = (x_shift, x_scale ** 2) if pre else (0.0, 1.0)
    vec = lambda s, m: (torch.randn(c, generator=g) * s + m).to(device)  # noqa: E731
    b = dict(
        x=common.randn((n, cin, h, w), dtype, device, layout, scale=x_scale, shift=x_shift, gen=g),
        conv_weight=common.randn((cout, cin // groups, k, k), dtype, device, layout,
                                 scale=fan_in ** -0.5, gen=g),
        grad_y=common.randn((n, cout, oh, ow), dtype, device, layout, gen=g),
    )
    if pattern == "conv_act":
        b["conv_bias"] = vec(0.1, 0.0).to(dtype)
    else:
        b.update(bn_weight=vec(0.1, 1.0), bn_bias=vec(0.1, 0.0), running_mean=vec(0.1, mu),
                 running_var=((torch.rand(c, generator=g) * 0.2 + 0.9) * var).to(device))
    b["module"] = EvalUnit(pattern, spec, b).eval()
    return b


def default_layouts(args, device) -> str:
    if device.type == "cuda":
        return "cl"
    return "nchw,cl" if args.full else "nchw"


def selected_modes(args) -> list:
    spec = args.conv_modes or ("eval,eval1,train" if args.full else "eval")
    names = [m.strip() for m in spec.split(",") if m.strip()]
    for m in names:
        if m not in MODES:
            raise SystemExit(f"unknown conv mode {m!r}; expected some of {list(MODES)}")
    return names


def build_cases(args, device) -> list:
    cases = []
    layouts = timing.parse_layouts(args, default_layouts(args, device))
    dtypes = timing.parse_dtypes(args, device, "bf16" if device.type == "cuda" else "fp32")
    by_batch = OrderedDict()  # batch -> [(mode, direction)]
    for m in selected_modes(args):
        batch, mode, direction = MODES[m]
        by_batch.setdefault(batch or args.batch, []).append((mode, direction))
    for batch, modes in by_batch.items():
        if args.conv_shapes:
            table = parse_conv_shapes(args.conv_shapes, batch)
        else:
            table = shapes_mod.conv_shapes(batch, args.full) + conv_act_shapes(batch, args.full)
            if args.conv_models:
                wanted = set(args.conv_models.split(","))
                unknown = wanted - set(CONV_MODELS)
                if unknown:
                    raise SystemExit(f"unknown --conv-models {sorted(unknown)}; expected "
                                     + ", ".join(CONV_MODELS))
                table = [e for e in table if wanted & set(e["models"])]
        meta = OrderedDict(((e["spec"], e["pattern"]), e) for e in table)
        for entry, layout, dtype, base in common.case_grid(list(meta), args, device, make_base,
                                                           layouts, dtypes):
            spec, pattern = entry
            e = meta[entry]
            stride, padding, groups = spec[6], spec[7], spec[8]
            for mode, direction in modes:
                train = mode == "train"
                flops = shapes_mod.conv_flops(spec) * (3 if direction == "fwd+bwd" else 1)
                case = "/".join([shapes_mod.conv_spec_str(spec), layout,
                                 timing.DTYPE_NAMES[dtype], OP_NAMES[pattern], mode, direction])
                extra = dict(pattern=pattern, models=e["models"], mode=mode, batch=batch,
                             layout=layout, dtype=timing.DTYPE_NAMES[dtype])
                note = (f"{e['layer']} x{e['count']}; flops 2*N*Cout*OH*OW*Cin/g*k*k"
                        + (" x3" if direction == "fwd+bwd" else ""))
                if train:
                    if pattern == "conv_act":
                        diff, state = ("x", "conv_weight", "conv_bias"), ()
                    else:
                        diff = ("x", "conv_weight", "bn_weight", "bn_bias")
                        state = ("running_mean", "running_var")
                    names = [*diff, *state, "grad_y"]

                    def make_inputs(base=base, names=names, diff=diff):
                        return common.clone_inputs(base(), names, diff)

                    # EAGER's arguments: the differentiated tensors, the state, training=True
                    def args_of(inp, names=diff + state,
                                training=() if pattern == "conv_act" else (True,)):
                        return (*(inp[n] for n in names), *training)

                    def eager(inp, f=EAGER[pattern], s=stride, p=padding, gr=groups,
                              args_of=args_of):
                        return f(*args_of(inp), s, p, gr)

                    def fused(inp, pat=pattern, s=stride, p=padding, gr=groups,
                              args_of=args_of):
                        return fused_call(pat, *args_of(inp), s, p, gr)

                    cases.append(common.Case(
                        bench=BENCH, case=case, make_inputs=make_inputs, eager=eager,
                        fused=fused, direction=direction, grad_mode=True, nbytes=None,
                        dtype=dtype, diff=diff, state=state,
                        compile_key=(entry, layout, dtype, mode), note=note, flops=flops,
                        extra=extra, untie=untie_relu(pattern, stride, padding, groups)))
                else:
                    def make_inputs(base=base):
                        b = base()
                        return {"x": b["x"].clone(), "module": b["module"]}

                    def compile_fn(mode_, base=base):
                        return FreezeOnCompile(base()["module"], mode_)

                    cases.append(common.Case(
                        bench=BENCH, case=case, make_inputs=make_inputs,
                        eager=lambda inp: inp["module"](inp["x"]),
                        fused=lambda inp: inp["module"].fused(inp["x"]),
                        direction=direction, grad_mode=False, nbytes=None, dtype=dtype,
                        compile_key=(entry, layout, dtype, mode), note=note, flops=flops,
                        extra=dict(extra, compile_note="inductor freezing"),
                        compile_fn=compile_fn))
    return cases


# ---------------------------------------------------------------------- summary
def _gmean(vals) -> float:
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def summarize(rows, cases, args, device, threads) -> list:
    """Geometric-mean speedups over the ResNet-50 eval cases, per (batch, layout,
    dtype): printed to stdout and written as SUMMARY_BENCH rows. Returns the lines."""
    if args.conv_models and "resnet50" not in args.conv_models.split(","):
        return []  # only DenseNet's shapes: its stem alone is no ResNet-50 geomean
    extra = {c.case: c.extra for c in cases}
    times = OrderedDict()  # group -> case -> variant -> median_ms
    for r in rows:
        x = extra.get(r["case"])
        if not x or x["mode"] != "eval" or x["pattern"] != "conv_bn_act" \
                or "resnet50" not in x["models"]:
            continue
        grp = (x["batch"], x["layout"], x["dtype"])
        times.setdefault(grp, OrderedDict()).setdefault(r["case"], {})[r["variant"]] = \
            float(r["median_ms"])
    if not times:
        return []
    dev_name = timing.device_name(device, threads)
    out = timing.ResultsCSV(args.out, dev_name, SUMMARY_BENCH)
    compile_name = "compile" if not args.compile_mode else f"compile-{args.compile_mode}"
    lines = []
    for (batch, layout, dtype), per_case in times.items():
        cases_ok = [t for t in per_case.values() if "eager" in t]
        variants = [v for v in next(iter(cases_ok)) if v != "eager"] if cases_ok else []
        # The shape count is part of the case: the quick set's geomean must not
        # replace the full set's in the CSV.
        label = f"resnet50/N{batch}/{layout}/{dtype}/conv_bn_relu/eval/fwd/{len(cases_ok)}-shapes"
        parts = []
        for v in variants:
            vs_eager = _gmean([t["eager"] / t[v] for t in cases_ok if v in t])
            vs_comp = None
            if v != compile_name and all(compile_name in t for t in cases_ok):
                vs_comp = _gmean([t[compile_name] / t[v] for t in cases_ok if v in t])
            parts.append(f"{v} {vs_eager:.3f}x vs eager"
                         + (f", {vs_comp:.3f}x vs {compile_name}" if vs_comp else ""))
            out.add(dict(bench=SUMMARY_BENCH, case=label, variant=v, n=len(cases_ok),
                         speedup_vs_eager=vs_eager, device=dev_name,
                         threads=threads if device.type == "cpu" else None,
                         torch=torch.__version__,
                         date=timing._dt.datetime.now().isoformat(timespec="seconds"),
                         note=f"geomean over {len(cases_ok)} ResNet-50 eval shapes (unweighted)"
                              + (f"; vs {compile_name} {vs_comp:.4g}x" if vs_comp else "")))
        lines.append(f"[{BENCH}] geomean over {len(cases_ok)} ResNet-50 eval shapes "
                     f"(N={batch}, {layout}, {dtype}): " + "; ".join(parts))
    for line in lines:
        print(line)
    sys.stdout.flush()
    return lines


def main(argv=None) -> list:
    import argparse

    ap = timing.common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = ap.parse_args(argv)
    device, threads = timing.setup(args)
    cases = build_cases(args, device)
    rows = common.run_cases(cases, args, device, threads, BENCH)
    summarize(rows, cases, args, device, threads)
    return rows


if __name__ == "__main__":
    main()
