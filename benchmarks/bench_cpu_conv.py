"""cpu_conv benchmark: the cpu backend's two kernels for an fp32 channels_last
inference conv + bias + activation, against each other, on the models' conv
shapes (ReLU, or as in EfficientNet-B0: SiLU after its expand and head convs,
none after its project convs).

* ``onednn``: ``mkldnn._convolution_pointwise`` on a weight prepacked once into
  oneDNN's layout, SiLU as its swish post-op, ReLU as an in-place pass after
  (oneDNN's ReLU post-op maps NaN to 0): what the backend runs for the convs
  the direct kernel does not take;
* ``direct``: convkernels' NHWC kernel (``convkernels_C.conv2d_nhwc_`` on its
  packed weight, bias and activation in registers, with the instruction set
  ``convkernels_C.conv_isa()`` names, or ``--isa``;
  convkernels/ops/_conv_direct.py), run here whatever ``direct_pays`` would
  choose, so that its thresholds can be checked (``takes`` in the note:
  whether the backend picks it for the shape).

The two take turns, ``--rounds`` times, per shape, so that a change of machine
load hits both. Rows (bench ``cpu_conv``, case ``<N>x<Cin>x<H>x<W>-><Cout> k<k>
s<s>/<model>``): median/p20/p80 pooled over rounds; ``speedup_vs_eager`` of the
``direct`` row is onednn's median / direct's (the baseline here is oneDNN, not
eager). At the end, per model and batch, the summed medians of each and of
the backend's choice (direct where it takes the shape) are printed.

    PYTHONPATH=. python benchmarks/bench_cpu_conv.py              # batch 1, every model's shapes
    PYTHONPATH=. python benchmarks/bench_cpu_conv.py --batch 8 --conv-models resnet50
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import timing  # noqa: E402

BENCH = "cpu_conv"
# (Cin, Cout, H (= W), k, stride, padding[, act]; relu if not given): the
# distinct groups-1 convs with >= 16 input channels of each model at 224x224
# (ResNet-50's and GoogLeNet's strided ones left out), EfficientNet-B0's 1x1
# expand (silu), project (identity) and head convs (its SE convs, at 1x1, left out).
SHAPES = OrderedDict([
    ("resnet50", [(64, 64, 56, 1, 1, 0), (64, 64, 56, 3, 1, 1), (64, 256, 56, 1, 1, 0),
                  (256, 64, 56, 1, 1, 0), (128, 128, 28, 3, 1, 1), (128, 512, 28, 1, 1, 0),
                  (512, 128, 28, 1, 1, 0), (256, 256, 14, 3, 1, 1), (1024, 256, 14, 1, 1, 0),
                  (256, 1024, 14, 1, 1, 0), (512, 512, 7, 3, 1, 1), (512, 2048, 7, 1, 1, 0),
                  (2048, 512, 7, 1, 1, 0)]),
    ("vgg16", [(64, 64, 224, 3, 1, 1), (128, 128, 112, 3, 1, 1), (256, 256, 56, 3, 1, 1),
               (512, 512, 28, 3, 1, 1), (512, 512, 14, 3, 1, 1)]),
    ("densenet121", [(256, 128, 56, 1, 1, 0), (128, 32, 56, 3, 1, 1), (512, 128, 28, 1, 1, 0),
                     (128, 32, 28, 3, 1, 1), (1024, 128, 14, 1, 1, 0), (128, 32, 14, 3, 1, 1),
                     (992, 128, 7, 1, 1, 0), (128, 32, 7, 3, 1, 1)]),
    ("efficientnet_b0", [(16, 96, 112, 1, 1, 0, "silu"), (24, 144, 56, 1, 1, 0, "silu"),
                         (40, 240, 28, 1, 1, 0, "silu"), (80, 480, 14, 1, 1, 0, "silu"),
                         (112, 672, 14, 1, 1, 0, "silu"), (192, 1152, 7, 1, 1, 0, "silu"),
                         (96, 24, 56, 1, 1, 0, "identity"), (144, 40, 28, 1, 1, 0, "identity"),
                         (240, 80, 14, 1, 1, 0, "identity"), (480, 112, 14, 1, 1, 0, "identity"),
                         (672, 192, 7, 1, 1, 0, "identity"), (1152, 320, 7, 1, 1, 0, "identity"),
                         (320, 1280, 7, 1, 1, 0, "silu")]),
    ("googlenet", [(64, 192, 56, 3, 1, 1), (192, 64, 28, 1, 1, 0), (96, 128, 28, 3, 1, 1),
                   (16, 32, 28, 3, 1, 1), (480, 16, 14, 1, 1, 0), (96, 208, 14, 3, 1, 1),
                   (832, 384, 7, 1, 1, 0), (48, 128, 7, 3, 1, 1)]),
])


def _calls(n, cin, cout, h, k, s, p, act):
    """(onednn, direct, takes): the two calls on the same tensors, and whether
    the backend would pick the direct kernel."""
    from convkernels.ops import _conv_direct

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g) * 0.1
    conv = ([s, s], [p, p], [1, 1])
    prepacked = torch.ops.mkldnn._reorder_convolution_weight(w, conv[1], conv[0], conv[2], 1,
                                                             list(x.shape))
    packed = _conv_direct.pack(w)
    oh = (h + 2 * p - k) // s + 1
    out = torch.empty(n, cout, oh, oh).contiguous(memory_format=torch.channels_last)

    post = "swish" if act == "silu" else "none"

    def onednn():
        y = torch.ops.mkldnn._convolution_pointwise(x, prepacked, b, conv[1], conv[0], conv[2],
                                                    1, post, [], "")
        return y.relu_() if act == "relu" else y

    def direct():
        torch.ops.convkernels_C.conv2d_nhwc_(out, x, packed, b, None, *conv, act)
        return out

    ref = getattr(torch.nn.functional, act, lambda z: z)(torch.nn.functional.conv2d(x, w, b, s, p))
    for f in (onednn, direct):
        torch.testing.assert_close(f(), ref, atol=1e-4, rtol=1e-4)
    takes = _conv_direct.direct_pays(x, w, (s, s), (p, p), (1, 1), 1, act)
    return onednn, direct, takes


def main(argv=None) -> list:
    parser = timing.common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.set_defaults(batch=1)
    parser.add_argument("--isa", choices=["avx2", "avx512"],
                        help="the direct kernel's instruction set (default: the best this CPU has)")
    args = parser.parse_args(argv)
    common.import_convkernels()
    device, threads = timing.setup(args)
    if device.type != "cpu":
        raise SystemExit("cpu_conv compares CPU kernels: run it with --device cpu")
    if torch.ops.convkernels_C.conv_isa() == "none":
        raise SystemExit("convkernels._C was built without AVX2: no direct kernel to measure")
    if args.isa:
        torch.ops.convkernels_C.set_conv_isa(args.isa)
    isa = torch.ops.convkernels_C.conv_isa()
    models = [m for m in (args.conv_models or ",".join(SHAPES)).split(",") if m]
    unknown = set(models) - set(SHAPES)
    if unknown:
        raise SystemExit(f"unknown --conv-models {sorted(unknown)}; "
                         f"expected some of {list(SHAPES)}")
    name = timing.device_name(device, threads)
    csv = timing.ResultsCSV(args.out, name, BENCH, fresh=args.fresh)
    progress = timing.Progress(BENCH, sum(len(SHAPES[m]) for m in models), unit="shapes")
    rows, totals = [], OrderedDict()
    for model in models:
        for cin, cout, h, k, s, p, *act in SHAPES[model]:
            n, act = args.batch, (act or ["relu"])[0]
            case = f"{n}x{cin}x{h}x{h}->{cout} k{k} s{s} {act}/{model}"
            onednn, direct, takes = _calls(n, cin, cout, h, k, s, p, act)
            times = {"onednn": [], "direct": []}
            for _ in range(args.rounds):
                for variant, f in (("onednn", onednn), ("direct", direct)):
                    st = timing.measure(f, device, min_run_time=args.min_run_time, raw=True)
                    times[variant] += st["times_s"]
            stats = {v: timing.summarize(t) for v, t in times.items()}
            flops = 2 * n * cout * ((h + 2 * p - k) // s + 1) ** 2 * cin * k * k
            base = stats["onednn"]["median_ms"]
            for variant, st in stats.items():
                row = timing.make_row(BENCH, case, variant, st, backend="cpu", flops=flops,
                                      eager_ms=base if variant == "direct" else None,
                                      device=name, threads=threads,
                                      note=f"fp32 channels_last eval; direct {isa}; "
                                           f"takes={takes}")
                csv.add(row)
                rows.append(row)
            t = totals.setdefault(model, [0.0, 0.0, 0.0])
            t[0] += base
            t[1] += stats["direct"]["median_ms"]
            t[2] += stats["direct" if takes else "onednn"]["median_ms"]
            progress.step(f"{case}: onednn/direct {base / stats['direct']['median_ms']:.2f}"
                          f" (takes={takes})")
    for model, (a, b, chosen) in totals.items():
        print(f"[{BENCH}] {model} batch {args.batch}: onednn {a:.2f} ms, direct {b:.2f} ms "
              f"(onednn/direct {a / b:.2f}); the backend's choice {chosen:.2f} ms "
              f"(onednn/choice {a / chosen:.2f})")
    return rows


if __name__ == "__main__":
    main()
