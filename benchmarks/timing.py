"""Shared benchmark harness: timing, device naming, results CSV, progress.

Every bench script (bn_act, add_act, and later conv / model benchmarks) uses it:

* :func:`measure` times a callable: median and p20/p80 in ms.
  - CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with an explicit thread
    count; the quantiles come from the per-block times of the measurement.
  - CUDA: ``torch.cuda.Event`` pairs around each rep, with the L2 cache flushed
    (a buffer larger than L2 is overwritten) before every rep, after a warmup;
    the rep count adapts to the op's duration. Also reports the peak memory
    allocated by one call.
* :func:`device_name` gives the results file stem (``cpu-AMD-EPYC-2threads``,
  ``NVIDIA-H100-80GB-HBM3``).
* :class:`ResultsCSV` writes ``<out>/<device>.csv``: rows keyed by
  (bench, case, variant); a rerun replaces the rows it produces and keeps all
  the others (``fresh=True`` first drops every row of its bench).
* :class:`Progress`: ``cases done / total, elapsed`` on stderr.
* :func:`common_args` / :func:`setup`: the command-line options every script shares.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

COLUMNS = [
    "bench", "case", "variant", "backend",
    "median_ms", "p20_ms", "p80_ms", "n",
    "bytes", "gbps", "pct_peak_bw", "flops", "tflops",
    "speedup_vs_eager", "peak_mem_mb", "mem_vs_eager", "max_rel_err",
    "device", "threads", "torch", "date", "note",
]
KEY = ("bench", "case", "variant")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ------------------------------------------------------------------- devices
def _sanitize(s: str) -> str:
    s = re.sub(r"\(R\)|\(TM\)|\(tm\)|\(r\)", "", s)
    s = re.sub(r"[^A-Za-z0-9.+_-]+", "-", s.strip())
    return re.sub(r"-+", "-", s).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device | str, threads: Optional[int] = None) -> str:
    """File-name-safe device name: ``cpu-<model>-<n>threads`` or the CUDA device name."""
    device = torch.device(device)
    if device.type == "cuda":
        return _sanitize(torch.cuda.get_device_name(device))
    threads = torch.get_num_threads() if threads is None else threads
    return f"cpu-{_sanitize(cpu_model())}-{threads}threads"


# Peak DRAM bandwidth in GB/s (1e9 B/s), by substring of the CUDA device name.
# First match wins, so the more specific names come first.
_PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
]


def peak_gbps(device: torch.device | str, override: Optional[float] = None) -> Optional[float]:
    """The device's peak memory bandwidth in GB/s, or None when unknown.
    ``override`` (or env ``CONVKERNELS_PEAK_GBPS``) wins."""
    if override:
        return float(override)
    env = os.environ.get("CONVKERNELS_PEAK_GBPS")
    if env:
        return float(env)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbps in _PEAK_GBPS:
        if key in name:
            return gbps
    return None


# -------------------------------------------------------------------- timing
def _quantile(sorted_vals, q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_s: Iterable[float]) -> dict:
    t = sorted(times_s)
    return dict(median_ms=statistics.median(t) * 1e3, p20_ms=_quantile(t, 0.2) * 1e3,
                p80_ms=_quantile(t, 0.8) * 1e3, n=len(t))


_l2_buffers: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer of at least twice the L2 size (>= 64 MiB)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _l2_buffers:
        l2 = getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or 0
        nbytes = max(2 * l2, 64 << 20)
        _l2_buffers[idx] = torch.empty(nbytes // 4, dtype=torch.int32, device=f"cuda:{idx}")
    return _l2_buffers[idx]


def _measure_cuda(fn: Callable[[], object], device: torch.device, warmup: int,
                  min_run_time: float, min_reps: int, max_reps: int, flush_l2: bool,
                  raw: bool) -> dict:
    buf = _l2_flush_buffer(device) if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    # Estimate one call's time to pick the rep count.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est_s = max(start.elapsed_time(end) / 3 / 1e3, 1e-6)
    reps = int(min(max(min_run_time / est_s, min_reps), max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if buf is not None:
            buf.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    out = summarize(times)
    if raw:
        out["times_s"] = times
    # Peak memory of one call, above what was allocated before it.
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    out["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def _measure_cpu(fn: Callable[[], object], threads: int, warmup: int, min_run_time: float,
                 raw: bool, min_samples: int) -> dict:
    from torch.utils.benchmark import Timer

    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 > 0.05:  # slow op: one warmup call is enough
            break
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)  # per-run time of each block
    while len(times) < min_samples:  # slow op: a few single runs more for the quantiles
        times += list(timer.timeit(number=1).times)
    out = summarize(times)
    out["peak_mem_mb"] = None
    if raw:
        out["times_s"] = times
    return out


def measure(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3,
            min_run_time: Optional[float] = None, threads: Optional[int] = None,
            min_reps: int = 20, max_reps: int = 2000, flush_l2: bool = True,
            raw: bool = False, min_samples: int = 5) -> dict:
    """Time ``fn()`` on ``device``: dict(median_ms, p20_ms, p80_ms, n, peak_mem_mb).

    CPU: ``n`` blocks of ``blocked_autorange`` (each a mean over several runs), on
    ``threads`` threads (default: torch.get_num_threads()). CUDA: ``n`` single
    reps timed with events, L2 flushed before each (``flush_l2``).
    ``min_run_time`` (s): total measured time to aim for (CPU default 0.3, CUDA 0.2).
    ``min_samples``: CPU, at least this many blocks (single runs for slow ops).
    ``raw``: also return the individual times (``times_s``, seconds) for pooling.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_cuda(fn, device, warmup=max(warmup, 5),
                             min_run_time=0.2 if min_run_time is None else min_run_time,
                             min_reps=min_reps, max_reps=max_reps, flush_l2=flush_l2, raw=raw)
    threads = torch.get_num_threads() if threads is None else threads
    return _measure_cpu(fn, threads, warmup, 0.3 if min_run_time is None else min_run_time, raw,
                        min_samples)


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------- results
def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class ResultsCSV:
    """``<out_dir>/<device>.csv``, keyed by (bench, case, variant).

    Each :meth:`add` upserts one row and rewrites the file (so a killed run keeps
    what it measured). ``fresh=True`` drops the bench's earlier rows on the first write.
    """

    def __init__(self, out_dir: Path | str, device: str, bench: str, *, fresh: bool = False):
        self.path = Path(out_dir) / f"{device}.csv"
        self.bench = bench
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = self._read()
        if fresh:
            self.rows = [r for r in self.rows if r.get("bench") != bench]

    def _read(self) -> list:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def add(self, row: dict) -> None:
        row = {k: _fmt(row.get(k)) for k in COLUMNS}
        row["bench"] = row["bench"] or self.bench
        key = tuple(row[k] for k in KEY)
        self.rows = [r for r in self.rows if tuple(r.get(k, "") for k in KEY) != key]
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k, "") for k in COLUMNS})
        os.replace(tmp, self.path)


def make_row(bench: str, case: str, variant: str, stats: dict, *, backend: str = "",
             nbytes: Optional[int] = None, flops: Optional[float] = None,
             eager_ms: Optional[float] = None, peak: Optional[float] = None,
             device: str = "", threads: Optional[int] = None, note: str = "") -> dict:
    """A results row from :func:`measure`'s stats and the ideal byte / flop counts."""
    med_s = stats["median_ms"] / 1e3
    gbps = nbytes / med_s / 1e9 if nbytes else None
    return dict(
        bench=bench, case=case, variant=variant, backend=backend,
        median_ms=stats["median_ms"], p20_ms=stats["p20_ms"], p80_ms=stats["p80_ms"], n=stats["n"],
        bytes=nbytes, gbps=gbps,
        pct_peak_bw=100.0 * gbps / peak if (gbps and peak) else None,
        flops=flops, tflops=flops / med_s / 1e12 if flops else None,
        speedup_vs_eager=eager_ms / stats["median_ms"] if eager_ms else None,
        peak_mem_mb=stats.get("peak_mem_mb"),
        device=device, threads=threads, torch=torch.__version__,
        date=_dt.datetime.now().isoformat(timespec="seconds"), note=note,
    )


# ------------------------------------------------------------------ progress
class Progress:
    """``[bench] done/total cases, elapsed`` on stderr; one line per case
    (overwritten in place on a terminal)."""

    def __init__(self, bench: str, total: int, stream=sys.stderr, unit: str = "cases"):
        self.bench, self.total, self.done, self.unit = bench, total, 0, unit
        self.t0 = time.perf_counter()
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def _line(self, msg: str) -> str:
        el = time.perf_counter() - self.t0
        return f"[{self.bench}] {self.done}/{self.total} {self.unit}, {el:6.1f}s elapsed  {msg}"

    def start(self, msg: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self._line("running " + msg))
            self.stream.flush()

    def step(self, msg: str = "") -> None:
        self.done += 1
        line = self._line(msg)
        self.stream.write(("\r\033[K" + line) if self.tty else line + "\n")
        if self.tty and self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ------------------------------------------------------------------ CLI bits
def common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options shared by every bench script."""
    p = parser
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="results dir (default: benchmarks/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores, torch.get_num_threads())")
    p.add_argument("--full", action="store_true", help="every ResNet-50/DenseNet-121 shape")
    p.add_argument("--batch", type=int, default=32, help="batch size of the model shapes")
    p.add_argument("--shapes", default=None,
                   help="explicit shapes 'N,C,H,W;N,C,H,W' (overrides quick/--full)")
    p.add_argument("--dtypes", default=None,
                   help="comma list of fp32,bf16,fp16 (default: cpu fp32; cuda fp32,bf16; "
                        "conv_bn_act on cuda: bf16)")
    p.add_argument("--layouts", default=None,
                   help="comma list of nchw,cl (default nchw,cl; conv_bn_act: CPU quick nchw, "
                        "CPU --full nchw,cl, CUDA cl)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default None; e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--backends", default=None,
                   help="convkernels backends to time (default: auto; on CUDA also triton,cuda "
                        "when available)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of measurement per variant and round (CPU default 0.15, CUDA 0.1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="variants are timed in turn this many times, times pooled (default 3)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="device peak bandwidth for pct_peak_bw (GPU: from a table)")
    p.add_argument("--fresh", action="store_true",
                   help="drop this bench's earlier rows from the CSV first")
    # conv_bn_act only (shared so that run_all.py can pass them through to every bench).
    p.add_argument("--conv-modes", default=None,
                   help="conv_bn_act: comma list of eval (batch --batch), eval1 (batch 1), train "
                        "(fwd+bwd, batch --batch); default: quick eval, --full all three")
    p.add_argument("--conv-shapes", default=None,
                   help="conv_bn_act: explicit convs 'Cin,H,W,Cout,k,stride,padding[,groups]"
                        "[,pre];...' (pre: BN->ReLU->conv, else conv->BN->ReLU); batch from "
                        "--conv-modes / --batch")
    p.add_argument("--conv-models", default=None,
                   help="conv_bn_act: only the shapes of these models, comma list of resnet50,"
                        "densenet121 (default both)")
    # densenet only (the end-to-end model bench; a fresh process per variant and mode).
    p.add_argument("--dn-arch", default="densenet121",
                   choices=["densenet121", "densenet161", "densenet169", "densenet201"])
    p.add_argument("--dn-modes", default="train,eval", help="densenet: comma list of train,eval")
    p.add_argument("--dn-variants", default=None,
                   help="densenet: comma list (default all): torchvision, torchvision-memeff, "
                        "torchvision-compile, torchvision-cl, convkernels, convkernels-memeff")
    p.add_argument("--dn-size", type=int, default=224, help="densenet: image size (default 224)")
    p.add_argument("--dn-train-batch", type=int, default=None,
                   help="densenet: train batch (default CPU 16, CUDA 64)")
    p.add_argument("--dn-eval-batch", type=int, default=None,
                   help="densenet: eval batch (default CPU 8, CUDA 64)")
    p.add_argument("--dn-steps", type=int, default=None,
                   help="densenet: timed steps per process (default CPU 3, --full 5; CUDA 20, "
                        "--full 50)")
    p.add_argument("--dn-rounds", type=int, default=1,
                   help="densenet: processes per variant and mode, taking turns (default 1)")
    # models only (whole torchvision models; see bench_models.py).
    p.add_argument("--models", default=None,
                   help="models: comma list of torchvision builder names (default resnet50,"
                        "densenet121; --full: the seven of bench_models.MODELS)")
    p.add_argument("--modes", default=None,
                   help="models: comma list of eval<N>, train<N> (batch N; default eval1; --full: "
                        "eval1,eval8,train16)")
    p.add_argument("--variants", default=None,
                   help="models: comma list of torchvision, torchvision-cl, torchvision-compile, "
                        "convkernels, convkernels-cl, onnxruntime, openvino (default torchvision,"
                        "convkernels,onnxruntime; --full: all)")
    p.add_argument("--size", type=int, default=224, help="models: image size (default 224)")
    return p


def setup(args) -> tuple[torch.device, int]:
    """Applies the shared options: device, thread count, inductor settings."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if device.type == "cuda":
        if device.index is None:  # "cuda" names the current GPU; set_device needs its index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        # Inductor's parallel compile workers cost more than they save on a few cores.
        import torch._inductor.config as inductor_config

        if os.cpu_count() and os.cpu_count() <= 4 and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
            inductor_config.compile_threads = 1
    return device, threads


def parse_dtypes(args, device: torch.device, default: Optional[str] = None) -> list:
    """``--dtypes``, else ``default``, else CPU fp32 / CUDA fp32,bf16."""
    spec = args.dtypes or default or ("fp32,bf16" if device.type == "cuda" else "fp32")
    return [DTYPES[s.strip()] for s in spec.split(",") if s.strip()]


def parse_layouts(args, default: str = "nchw,cl") -> list:
    """``--layouts``, else ``default``."""
    out = []
    for s in (args.layouts or default).split(","):
        s = s.strip().lower()
        if s in ("nchw", "contiguous"):
            out.append("nchw")
        elif s in ("cl", "nhwc", "channels_last"):
            out.append("cl")
        elif s:
            raise SystemExit(f"unknown layout {s!r}")
    return out


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "cl" else torch.contiguous_format


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=memory_format(layout))


def shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)
