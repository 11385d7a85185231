"""Runs the DenseNet and whole-model benchmarks and every op benchmark, then plots the speedups.

    PYTHONPATH=. python benchmarks/run_all.py            # densenet121 train/eval; models: resnet50, densenet121 eval1; ops quick: headline + 3 model shapes; conv: 7 convs, eval; nt_xent N 256, 1024 (no torch.compile)
    PYTHONPATH=. python benchmarks/run_all.py --compile  # the same with the torch.compile variants
    PYTHONPATH=. python benchmarks/run_all.py --full     # every ResNet-50 / DenseNet-121 BN and conv shape, all seven models, torch.compile everywhere
    PYTHONPATH=. python benchmarks/run_all.py --benches conv_bn_act   # one bench (+ its plot)
    PYTHONPATH=. python benchmarks/run_all.py --plot-only

Every option of the bench scripts is passed on to them (see ``--help`` of
bench_bn_act.py); ``--benches`` picks a subset. ``densenet`` (the end-to-end
model bench, first) draws its own ``<out>/<device>-densenet.png``, ``models`` (whole
torchvision models against torch.compile, ONNX Runtime, OpenVINO)
``<out>/<device>-models.png``. The op plot goes to
``<out>/<device>.png``: per bench, bars of speedup vs eager per case and variant,
whiskers from the variant's p20/p80 (eager median / variant p80 .. / p20).
With more than ``--plot-max-cases`` cases a bench is summarised per
(layout, dtype, op, mode, direction): bar = geometric mean over shapes, whiskers
= min / max over shapes.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections import OrderedDict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

BENCHES = OrderedDict([("densenet", "bench_densenet"), ("models", "bench_models"),
                       ("bn_act", "bench_bn_act"),
                       ("add_act", "bench_add_act"),
                       ("conv_bn_act", "bench_conv_bn_act"),
                       ("nt_xent", "bench_nt_xent")])


def plot(csv_path: str, png_path: str, max_cases: int = 80, benches=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] != "eager" and r["speedup_vs_eager"]]
    if benches:
        rows = [r for r in rows if r["bench"] in benches]
    eager = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            if r["variant"] == "eager":
                eager[(r["bench"], r["case"])] = float(r["median_ms"])
    by_bench = OrderedDict()
    for r in rows:
        if (r["bench"], r["case"]) in eager:  # summary rows (no eager of their own) are skipped
            by_bench.setdefault(r["bench"], []).append(r)
    if not by_bench:
        raise SystemExit(f"no rows to plot in {csv_path}")

    panels = []
    for bench, rs in by_bench.items():
        variants = list(OrderedDict.fromkeys(r["variant"] for r in rs))
        cases = list(OrderedDict.fromkeys(r["case"] for r in rs))
        data = {}  # (label, variant) -> (value, lo, hi)
        if len(cases) <= max_cases:
            labels = cases
            for r in rs:
                e = eager[(bench, r["case"])]
                data[(r["case"], r["variant"])] = (
                    float(r["speedup_vs_eager"]), e / float(r["p80_ms"]), e / float(r["p20_ms"]))
            title = f"{bench}: speedup vs eager (whiskers: p20/p80)"
        else:
            groups = OrderedDict()
            # The batch (a shape's first dim) joins the group when a bench has several.
            by_n = len({c.split("/")[0].split("x")[0] for c in cases}) > 1
            for r in rs:
                g = "/".join(r["case"].split("/")[1:]) + " (geomean)"
                if by_n:
                    g = f"N={r['case'].split('x')[0]} " + g
                groups.setdefault((g, r["variant"]), []).append(float(r["speedup_vs_eager"]))
            labels = list(OrderedDict.fromkeys(g for g, _ in groups))
            for (g, v), s in groups.items():
                gm = math.exp(sum(math.log(x) for x in s) / len(s))
                data[(g, v)] = (gm, min(s), max(s))
            title = f"{bench}: speedup vs eager, geomean over {len({c.split('/')[0] for c in cases})} shapes (whiskers: min/max)"
        panels.append((title, labels, variants, data))

    heights = [max(2.5, 0.12 * len(l) * max(len(v), 1) + 1.2) for _, l, v, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, labels, variants, data) in zip(axes[:, 0], panels):
        nv = len(variants)
        bar_h = 0.8 / nv
        for i, v in enumerate(variants):
            ys, xs, lo, hi = [], [], [], []
            for j, lab in enumerate(labels):
                if (lab, v) in data:
                    val, l, h = data[(lab, v)]
                    ys.append(j + (i - (nv - 1) / 2) * bar_h)
                    xs.append(val)
                    lo.append(max(val - l, 0))
                    hi.append(max(h - val, 0))
            # Bars grow from 1x (left for slowdowns, right for speedups).
            ax.barh(ys, [x - 1.0 for x in xs], left=1.0, height=bar_h, label=v)
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="none", ecolor="k", elinewidth=0.6, capsize=1.5)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("speedup vs eager (x, log2)")
        ax.set_title(f"{os.path.basename(csv_path)[:-4]}  {title}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    ap.add_argument("--benches", default=",".join(BENCHES), help="comma list of " + ",".join(BENCHES))
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot from the CSV")
    ap.add_argument("--plot-max-cases", type=int, default=80)
    ap.add_argument("--compile", action="store_true",
                    help="the torch.compile variants without --full too")
    own, rest = ap.parse_known_args(argv)
    # The shared options, parsed once to learn the device and the output dir.
    common = timing.common_args(argparse.ArgumentParser(add_help=False)).parse_args(rest)
    device, threads = timing.setup(common)
    dev_name = timing.device_name(device, threads)
    benches = [b.strip() for b in own.benches.split(",") if b.strip()]
    t0 = time.perf_counter()
    if not own.plot_only:
        import importlib

        # The quick default leaves torch.compile out (--compile or --full put it
        # back): its inductor warm-ups were most of a 20.5-minute run on the 2-core
        # AVX2 EPYC (DenseNet's train and eval 357 s + 109 s, the op benches' ~40%
        # of theirs), and make bench is to fit in 15.
        bench_rest = rest if common.full or own.compile else rest + ["--no-compile"]
        for b in benches:
            if b not in BENCHES:
                raise SystemExit(f"unknown bench {b!r}; expected one of {list(BENCHES)}")
            importlib.import_module(BENCHES[b]).main(bench_rest)
        print(f"[run_all] benches done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    csv_path = os.path.join(common.out, f"{dev_name}.csv")
    if not os.path.exists(csv_path):
        raise SystemExit(f"no results for this device yet: {csv_path}")
    with open(csv_path, newline="") as f:
        measured = {r["bench"] for r in csv.DictReader(f)}
    benches = [b for b in benches if b in measured]  # a bench this device has not run: no plot
    pngs = []
    if "densenet" in benches:
        import bench_densenet

        pngs.append(bench_densenet.plot(csv_path,
                                        os.path.join(common.out, f"{dev_name}-densenet.png")))
    if "models" in benches:
        import bench_models

        pngs.append(bench_models.plot(csv_path, os.path.join(common.out, f"{dev_name}-models.png")))
    op_benches = [b for b in benches if b not in ("densenet", "models")]
    if op_benches:
        pngs.append(plot(csv_path, os.path.join(common.out, f"{dev_name}.png"), own.plot_max_cases,
                         op_benches))
    print(f"[run_all] {csv_path}\n" + "\n".join(f"[run_all] {p}" for p in pngs), file=sys.stderr)


if __name__ == "__main__":
    main()
