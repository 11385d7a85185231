"""Whole torchvision models: convkernels against torchvision, torch.compile,
ONNX Runtime and OpenVINO, on the same weights and inputs.

Variants (all from one seeded torchvision model, BN running statistics from one
batch-statistics pass: see ``torchvision_model``):

* ``torchvision``          ``torchvision.models.<name>()`` (the baseline of every ratio)
* ``torchvision-cl``       the same, model and input channels_last
* ``torchvision-compile``  ``torch.compile`` of it; eval with inductor freezing
                           (BN folded, weights prepacked), as the conv bench does
* ``convkernels``          ``convkernels.models.<name>`` where that builder exists (given
                           torchvision's tensors, strict load_state_dict), else
                           ``convkernels.optimize(torchvision model)``
* ``convkernels-cl``       the same, channels_last
* ``onnxruntime``          eval only: ``torch.onnx.export`` of the torchvision model
                           (dynamo=True, else the TorchScript exporter; ``note`` says
                           which), CPU execution provider, intra-op threads = torch's
* ``openvino``             eval only: ``ov.convert_model`` of that ONNX file, compiled
                           for CPU with f32 inference precision and torch's thread count

Modes: ``eval<N>`` = a forward under ``torch.no_grad`` at batch N; ``train<N>`` = one
SGD step (zero_grad, forward, cross-entropy, backward, momentum SGD step) at batch N.
fp32, ``--size`` x ``--size`` images (224).

Each (model, mode, variant) lives in its own worker process for the whole case,
so memory figures and first calls are the variant's own. The workers of a case
are started one after the other; then they take turns, ``--rounds`` times, each
timing its step with ``timing.measure``, so that a change of machine load hits
every variant alike. Rows (bench ``models``, case ``<model>/<eval|train>/<N>x3x<S>x<S>/fp32``):

* ``<variant>``: median/p20/p80 over every round's samples, ``speedup_vs_eager`` =
  torchvision's median / this one; ``peak_mem_mb`` = the worker's peak RSS during a
  round's timed calls above its RSS before the model was built or loaded (so the
  weights, a compiler's or runtime's copy of them, grads and momentum count; CUDA:
  ``max_memory_allocated`` above what was allocated then), median over rounds;
  ``mem_vs_eager``; ``max_rel_err`` = max |out - torchvision's| / max |torchvision's|
  over the first call's logits (train: also over the stem conv's weight gradient,
  the larger of the two); ``note``: images/s, how the variant was built, flags.
* ``<variant> first call``: seconds from a built model (ONNX Runtime / OpenVINO: the
  ONNX file) to its first output: lazy initialisation, prepacking, compilation,
  session creation. One sample per worker; the ONNX export is in ``note``.

    PYTHONPATH=. python benchmarks/bench_models.py                  # quick: resnet50, densenet121, eval1
    PYTHONPATH=. python benchmarks/bench_models.py --full           # 7 models x eval1, eval8, train16 x all variants
    PYTHONPATH=. python benchmarks/bench_models.py --models googlenet --modes eval1,train4 --size 64 --rounds 1
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402
from bench_densenet import _reset_peak_rss, _rss_kib  # noqa: E402  (the peak-RSS helpers)

BENCH = "models"
BASELINE = "torchvision"
VARIANTS = ("torchvision", "torchvision-cl", "torchvision-compile", "convkernels",
            "convkernels-cl", "onnxruntime", "openvino")
RUNTIMES = ("onnxruntime", "openvino")  # eval-only variants, each named after its package
MODELS = ("resnet50", "resnext50_32x4d", "vgg16_bn", "googlenet", "efficientnet_b0",
          "regnet_y_400mf", "densenet121")
QUICK = dict(models="resnet50,densenet121", modes="eval1",
             variants="torchvision,convkernels,onnxruntime")
FULL = dict(models=",".join(MODELS), modes="eval1,eval8,train16", variants=",".join(VARIANTS))
# max_rel_err above this is flagged in note (logits; the stem gradient comes back
# through every training-mode BN: densenet121's, torchvision's own, is 9.8e-3 off float64,
# see bench_densenet.CHECK_TOL).
FLAG_ERR = {"out": 1e-3, "grad": 5e-2}


# ------------------------------------------------------------------ worker side
def torchvision_model(name: str, size: int) -> torch.nn.Module:
    """The seeded torchvision model every variant starts from (in train mode), with
    BN running statistics from one batch-statistics pass: at torchvision's init
    (mean 0, var 1) eval activations can vanish with depth (GoogLeNet's eval logits
    are then its fc bias), which would leave the error check nothing to compare."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = None  # a cumulative average: one pass sets the batch's statistics
    with torch.no_grad():
        model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model


def _build_torch(name: str, size: int, variant: str, device: torch.device, train: bool):
    """The variant's model and a line on how it was built."""
    model = torchvision_model(name, size)
    how = f"torchvision.models.{name}"
    if variant.startswith("convkernels"):
        import common  # convkernels from this checkout

        # The builder once it exists for this model, else optimize() (which leaves
        # the parts it does not know alone).
        builder = getattr(common.ck.models, name, None)
        if builder is not None:
            # Built on the meta device and given torchvision's tensors: one copy of
            # the weights in this process, as in the other variants.
            try:
                with torch.device("meta"):
                    ck_model = builder()
            except NotImplementedError:  # RegNet's builder computes its widths with tensors
                ck_model = builder()
            ck_model.load_state_dict(model.state_dict(), strict=True, assign=True)
            model, how = ck_model, f"convkernels.models.{name}"
        else:
            model, report = common.ck.optimize(model, inplace=True, report=True)
            how = f"convkernels.optimize: {len(report.fused)} fused parts, {len(report.left)} left"
    model = model.to(device, memory_format=timing.memory_format(
        "cl" if variant.endswith("-cl") else "nchw"))
    if variant.endswith("-compile"):
        model = torch.compile(model)
        how += ", torch.compile" + ("" if train else " with inductor freezing")
    return model, how


def _torch_step(model, x: torch.Tensor, train: bool, device: torch.device):
    """The step callable, and how to read the stem conv's gradient after it."""
    model.train(train)
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    target = target.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if train else None

    def step():
        if not train:
            with torch.no_grad():
                return model(x)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out  # GoogLeNet's aux heads: main logits only
        torch.nn.functional.cross_entropy(out, target).backward()
        opt.step()
        return out

    stem = next(p for p in model.parameters() if p.dim() == 4)
    return step, (lambda: stem.grad)


def _runtime_step(variant: str, onnx_path: str, x: torch.Tensor, threads: int):
    """ONNX Runtime / OpenVINO: load the ONNX file, returns the step (its first call
    included in the timed first call)."""
    xn = x.numpy()
    if variant == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # Its pool threads spin between runs by default, taking the cores from
        # the variants measured while this worker waits (densenet121's train
        # step: 0.80x torchvision with it, 1.12x without). They still spin
        # within a run, which ORT's own speed depends on (allow_spinning=0
        # made resnet50 b1 ~15% slower).
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: xn}
        return lambda: torch.from_numpy(sess.run(None, feed)[0])
    import openvino as ov

    compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda: torch.from_numpy(request.infer([xn])[0].copy())


def _worker(spec: dict) -> None:
    """One (model, mode, variant): builds it, runs the first call, then answers
    each ``measure`` line on stdin with one JSON line of timings."""
    # Replies go to the original stdout; anything the libraries print goes to stderr.
    reply_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(**kw):
        reply_stream.write(json.dumps(kw) + "\n")
        reply_stream.flush()

    # The parent's thread count, and its inductor settings for the compile variant.
    device, _ = timing.setup(argparse.Namespace(device=spec["device"], threads=spec["threads"]))
    variant, train = spec["variant"], spec["train"]
    if variant in RUNTIMES:
        importlib.import_module(variant)
    else:
        import torchvision  # noqa: F401  (imported before the memory base)

        if variant.startswith("convkernels"):
            import common  # noqa: F401
        if variant.endswith("-compile") and not train:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # eval compile as the conv bench: BN folded, prepacked
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"],
                    generator=torch.Generator().manual_seed(1)).to(device)
    cuda = device.type == "cuda"
    gc.collect()
    base_kib = _rss_kib("VmRSS")
    base_alloc = torch.cuda.memory_allocated(device) if cuda else 0
    how = ""
    t0 = time.perf_counter()
    if variant in RUNTIMES:
        step = _runtime_step(variant, spec["onnx"], x, spec["threads"])
        grad = None
    else:
        model, how = _build_torch(spec["model"], spec["size"], variant, device, train)
        if variant.endswith("-cl"):
            x = x.contiguous(memory_format=torch.channels_last)
        step, grad = _torch_step(model, x, train, device)
        t0 = time.perf_counter()  # first call: from the built model on
    torch.manual_seed(3)  # the same dropout masks in every eager-RNG variant's checked step
    out = step()
    timing.synchronize(device)
    first_s = time.perf_counter() - t0
    record = {"out": out.detach().float().cpu()}
    if train:
        record["grad"] = grad().float().cpu()
    torch.save(record, spec["record"])
    del out, record
    reply(first_s=first_s, how=how)
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        gc.collect()
        has_hwm = _reset_peak_rss() if not cuda else True
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        # CUDA: no L2 flush between calls; a model's steady state keeps what fits there.
        st = timing.measure(step, device, warmup=1, min_run_time=spec["min_run_time"], raw=True,
                            min_samples=spec["min_samples"], flush_l2=False)
        if cuda:
            peak = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
        else:
            peak = (_rss_kib("VmHWM") - base_kib) / 1024 if has_hwm else None
        reply(times_s=st["times_s"], peak_mem_mb=peak)


# ------------------------------------------------------------------ parent side
class Worker:
    """A worker process; its stderr goes to a log file shown when it fails."""

    def __init__(self, spec: dict, log_path: str):
        env = dict(os.environ)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--models-worker", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            with open(self.log_path) as f:
                tail = "".join(f.readlines()[-15:])
            raise RuntimeError(f"worker exited ({self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def measure(self) -> dict:
        try:
            self.proc.stdin.write("measure\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it has exited: read() says why
        return self.read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # EOF ends a live worker's loop
        except BrokenPipeError:
            pass  # it has exited, with an unsent "measure" in the buffer
        self.proc.wait()
        self.proc.stdout.close()


def export_onnx(name: str, batch: int, size: int, path: str) -> str:
    """torch.onnx.export of the torchvision model at a fixed shape; returns
    which exporter wrote it (dynamo=True first, then the TorchScript one)."""
    model = torchvision_model(name, size).eval()
    x = torch.randn(batch, 3, size, size)
    errors = []
    for dynamo in (True, False):
        try:
            torch.onnx.export(model, (x,), path, dynamo=dynamo, verbose=False)
            return f"dynamo={dynamo}"
        except Exception as e:  # the next exporter, or the reason for the skip
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    raise RuntimeError("; ".join(errors))


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if got.shape != ref.shape:
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _parse_modes(spec: str) -> list:
    modes = []
    for m in spec.split(","):
        match = re.fullmatch(r"(eval|train)(\d+)", m.strip())
        if not match:
            raise SystemExit(f"--modes: {m!r} is not eval<N> or train<N>")
        modes.append((match.group(1), int(match.group(2))))
    return modes


def _variants(args, device: torch.device) -> tuple:
    """The variants to run and {variant: why skipped} for those left out."""
    names = [v.strip() for v in (args.variants or (FULL if args.full else QUICK)["variants"]).split(",")
             if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}; expected some of {VARIANTS}")
    skipped = {}
    if args.no_compile and "torchvision-compile" in names:
        skipped["torchvision-compile"] = "--no-compile"
    for v in RUNTIMES:
        if v not in names:
            continue
        if device.type != "cpu":
            skipped[v] = f"CPU only (device {device})"
        elif importlib.util.find_spec(v) is None:
            skipped[v] = f"package {v!r} not installed (pip install {v} onnx onnxscript)"
    names = [BASELINE] + [v for v in VARIANTS if v in names and v != BASELINE and v not in skipped]
    return names, skipped


def main(argv=None) -> list:
    ap = timing.common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--models-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.models_worker:
        return _worker(json.loads(args.models_worker))
    device, threads = timing.setup(args)
    import torchvision

    grid = FULL if args.full else QUICK
    models = [m.strip() for m in (args.models or grid["models"]).split(",") if m.strip()]
    for m in models:
        if not callable(getattr(torchvision.models, m, None)):
            raise SystemExit(f"--models: torchvision.models has no builder {m!r}")
    modes = _parse_modes(args.modes or grid["modes"])
    variants, skipped = _variants(args, device)
    args.rounds = max(1, args.rounds)
    # Seconds of timed calls per variant and round; one worker each, so more than the op benches.
    args.min_run_time = args.min_run_time or (1.0 if args.full else 0.5)
    dev_name = timing.device_name(device, threads)
    results = timing.ResultsCSV(args.out, dev_name, BENCH, fresh=args.fresh)
    cases = [(m, mode, n) for m in models for mode, n in modes]
    per_case = [len(variants) if mode == "eval" else len([v for v in variants if v not in RUNTIMES])
                for _, mode, _ in cases]
    progress = timing.Progress(BENCH, sum(per_case) * args.rounds, unit="timed rounds")
    print(f"[{BENCH}] {len(cases)} cases on {dev_name}: models {models}, modes "
          f"{[f'{m}{n}' for m, n in modes]}, variants {variants}, fp32, {args.size}x{args.size}, "
          f"{args.rounds} round(s) of {args.min_run_time:g}s per variant -> {results.path}", file=sys.stderr)
    for v, why in skipped.items():
        print(f"[{BENCH}] skipping {v}: {why}", file=sys.stderr)
    if any(mode == "train" for mode, _ in modes) and set(variants) & set(RUNTIMES):
        print(f"[{BENCH}] {', '.join(v for v in variants if v in RUNTIMES)}: eval cases only "
              "(inference runtimes)", file=sys.stderr)
    # A time-boxed run (timeout's SIGTERM) still removes the temp dir (ONNX files of up
    # to ~0.5 GB) and closes the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_models-") as tmp:
        for name, mode, batch in cases:
            case = f"{name}/{mode}/{batch}x3x{args.size}x{args.size}/fp32"
            rows += _run_case(args, device, threads, dev_name, results, progress, tmp, name, mode,
                              batch, case, variants, skipped)
    png = plot(str(results.path), os.path.join(args.out, f"{dev_name}-models.png"))
    print(f"[{BENCH}] done in {progress.elapsed():.0f}s -> {results.path}, {png}", file=sys.stderr)
    if skipped:
        print(f"[{BENCH}] skipped: " + "; ".join(f"{v} ({why})" for v, why in skipped.items()),
              file=sys.stderr)
    return rows


def _run_case(args, device, threads, dev_name, results, progress, tmp, name, mode, batch, case,
              variants, skipped) -> list:
    """Starts the case's workers in turn, times them in interleaved rounds, writes the rows."""
    train = mode == "train"
    variants = [v for v in variants if not (train and v in RUNTIMES)]
    notes = {v: [] for v in variants}

    def skip(v, why, rounds_left=args.rounds):  # a printed reason, not a stop
        if v == BASELINE:
            raise RuntimeError(f"{case} {v}: {why}")
        lines = why.strip().splitlines()  # a worker's: "exited (code):", its log's tail
        skipped[f"{v} on {case}"] = " ".join(dict.fromkeys((lines[0], lines[-1])))
        print(f"[{BENCH}] skipping {v} on {case}: {why}", file=sys.stderr)
        progress.total -= rounds_left

    onnx = os.path.join(tmp, f"{name}-{batch}.onnx")
    if any(v in RUNTIMES for v in variants):
        t0 = time.perf_counter()
        try:
            exporter = export_onnx(name, batch, args.size, onnx)
        except RuntimeError as e:
            for v in RUNTIMES:
                if v in variants:
                    skip(v, f"ONNX export failed ({e})")
            variants = [v for v in variants if v not in RUNTIMES]
        else:
            for v in RUNTIMES:
                if v in notes:
                    notes[v].append(f"onnx export {exporter}, {time.perf_counter() - t0:.1f}s")
        gc.collect()
    workers, first = {}, {}
    times = {v: [] for v in variants}
    peaks = {v: [] for v in variants}
    try:
        for v in variants:
            spec = dict(model=name, variant=v, train=train, batch=batch, size=args.size,
                        device=str(device), threads=threads, onnx=onnx,
                        record=os.path.join(tmp, f"{v}.pt"), min_run_time=args.min_run_time,
                        min_samples=3 if train else 5)
            progress.start(f"{case} {v}: first call")
            workers[v] = Worker(spec, os.path.join(tmp, f"{v}.log"))
            try:
                msg = workers[v].read()
            except RuntimeError as e:
                workers.pop(v).close()
                skip(v, str(e))
                continue
            first[v] = msg["first_s"]
            notes[v] += [msg["how"]] if msg["how"] else []
        # The variants take turns, round after round.
        for rnd in range(args.rounds):
            for v, w in list(workers.items()):
                progress.start(f"{case} {v} round {rnd + 1}")
                try:
                    st = w.measure()
                except RuntimeError as e:
                    workers.pop(v).close()
                    skip(v, f"round {rnd + 1}: {e}", args.rounds - rnd)
                    continue
                times[v] += st["times_s"]
                if st["peak_mem_mb"] is not None:
                    peaks[v].append(st["peak_mem_mb"])
                progress.step(f"{case} {v} round {rnd + 1}: "
                              f"{statistics.median(st['times_s']) * 1e3:.1f} ms")
    finally:
        for w in workers.values():
            w.close()
    ref = torch.load(os.path.join(tmp, f"{BASELINE}.pt"))
    rows, base_ms, base_mem, summary = [], None, None, []
    for v in workers:
        rec = torch.load(os.path.join(tmp, f"{v}.pt"))
        errs = {k: max_rel_err(rec[k], ref[k]) for k in ref}
        if any(not e <= FLAG_ERR[k] for k, e in errs.items()):
            notes[v].append("MISMATCH vs torchvision: " + ", ".join(
                f"{k} {e:.2g}" for k, e in errs.items()))
            print(f"[{BENCH}] warning: {case} {v}: {notes[v][-1]}", file=sys.stderr)
        stats = timing.summarize(times[v])
        stats["peak_mem_mb"] = statistics.median(peaks[v]) if peaks[v] else None
        if v == BASELINE:
            base_ms, base_mem = stats["median_ms"], stats["peak_mem_mb"]
        row = timing.make_row(BENCH, case, v, stats, eager_ms=base_ms, device=dev_name,
                              threads=threads if device.type == "cpu" else None,
                              note="; ".join([f"{batch / stats['median_ms'] * 1e3:.1f} images/s"]
                                             + notes[v]))
        row["max_rel_err"] = max(errs.values())
        if stats["peak_mem_mb"] is not None and base_mem:
            row["mem_vs_eager"] = stats["peak_mem_mb"] / base_mem
        ms = first[v] * 1e3
        first_row = timing.make_row(BENCH, case, f"{v} first call",
                                    dict(median_ms=ms, p20_ms=ms, p80_ms=ms, n=1),
                                    eager_ms=first[BASELINE] * 1e3, device=dev_name,
                                    threads=row["threads"], note="; ".join(notes[v]))
        for r in (row, first_row):
            results.add(r)
            rows.append(r)
        summary.append(f"{v} {stats['median_ms']:.1f} ms x{row['speedup_vs_eager']:.2f}"
                       f" (first {first[v]:.2g}s)")
    print(f"[{BENCH}] {case}: " + ", ".join(summary), file=sys.stderr)
    return rows


def _ms(ms: float) -> str:
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def plot(csv_path: str, png_path: str) -> str:
    """Speedup vs torchvision per model, one panel per mode and batch (whiskers:
    torchvision's median over the variant's p80 / p20), and the first calls."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["bench"] == BENCH and r["speedup_vs_eager"]]
    colors = {v: plt.get_cmap("tab10")(i) for i, v in enumerate(VARIANTS)}
    panels = {}  # title -> [(label, variant, value, lo, hi, text)]
    base = {r["case"]: float(r["median_ms"]) for r in rows if r["variant"] == BASELINE}
    for r in rows:
        model, mode, shape = r["case"].split("/")[:3]
        if r["variant"].endswith(" first call"):
            s = float(r["median_ms"]) / 1e3
            panels.setdefault("first call (s, log scale; lower is better)", []).append(
                (f"{model} {mode}{shape.split('x')[0]}", r["variant"][:-len(" first call")],
                 s, s, s, f"{s:.3g}s"))
        elif r["case"] in base:
            sp, b = float(r["speedup_vs_eager"]), base[r["case"]]
            panels.setdefault(f"{mode}, batch {shape.split('x')[0]}, {shape.split('x', 2)[2]}: "
                              "speedup vs torchvision (whiskers p20/p80)", []).append(
                (model, r["variant"], sp, b / float(r["p80_ms"]), b / float(r["p20_ms"]),
                 f"{sp:.2f}x ({_ms(float(r['median_ms']))})"))
    if not panels:
        raise SystemExit(f"no {BENCH} rows to plot in {csv_path}")
    # The first-call panel last; within a panel each label's bars in VARIANTS order.
    order = sorted(panels, key=lambda t: t.startswith("first call"))
    for t in order:
        panels[t].sort(key=lambda e: VARIANTS.index(e[1]))
    heights = [0.9 + 0.15 * len(panels[t]) + 0.09 * len({e[0] for e in panels[t]}) for t in order]
    fig, axes = plt.subplots(len(order), 1, figsize=(11, sum(heights) + 0.3), layout="constrained",
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, title in zip(axes[:, 0], order):
        entries = panels[title]
        first_call = title.startswith("first call")
        y, ticks, labels, seen = 0.0, [], [], set()
        for lab in dict.fromkeys(e[0] for e in entries):
            group = [e for e in entries if e[0] == lab]
            ticks.append(y + (len(group) - 1) / 2)
            labels.append(lab)
            for _, v, val, lo, hi, text in group:
                legend = v if v not in seen else None
                seen.add(v)
                if first_call:
                    ax.barh(y, val, height=0.85, color=colors[v], label=legend)
                else:  # bars grow from 1x: left for slowdowns, right for speedups
                    ax.barh(y, val - 1, left=1, height=0.85, color=colors[v], label=legend)
                    ax.errorbar(val, y, xerr=[[max(0, val - lo)], [max(0, hi - val)]], fmt="none",
                                ecolor="k", elinewidth=0.6, capsize=1.5)
                # Right of the whisker (and of a slowdown's bar).
                ax.text(hi if first_call else max(hi, 1), y, f" {text}", va="center", fontsize=6)
                y += 1
            y += 0.6  # gap between labels
        if first_call:
            ax.set_xscale("log")
            ax.set_xlim(min(e[2] for e in entries) / 1.5, max(e[2] for e in entries) * 4)
        else:
            ax.axvline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlim(min(min(e[3] for e in entries), 1) / 1.15,
                        max(max(e[4] for e in entries), 1) * 2.2)  # room for the labels
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(y - 0.6 + 0.2, -0.8)  # top to bottom
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        handles = sorted(zip(*ax.get_legend_handles_labels()), key=lambda h: VARIANTS.index(h[1]))
        ax.legend(*zip(*handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{os.path.basename(csv_path)[:-4]}: whole models, fp32", fontsize=9)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    main()
