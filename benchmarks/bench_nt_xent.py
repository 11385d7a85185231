"""nt_xent benchmark: SimCLR's NT-Xent loss, forward + backward (gradients of z1, z2).

Variants: ``eager`` (the eager formula, ``convkernels.ops.reference.nt_xent_loss``:
normalise, the 2N x 2N similarity matrix, masked logsumexp), ``compile``
(torch.compile of it) and ``convkernels-<backend>`` (``convkernels.ops.nt_xent_loss``,
which never holds the 2N x 2N matrix).

Cases: N pairs of D = 128 features (``--nt-dims`` to change), temperature 0.5;
CPU N in {256, 1024} (``--full``: also 2048, 4096), CUDA N in {256, 1024, 4096}.
``flops`` counts eager's three GEMMs (2N x 2N x D each: the similarities and the
two of their backward), ``6 (2N)^2 D``; the fused backward recomputes the
similarities (a fourth).

Peak memory (``peak_mem_mb``, ``mem_vs_eager``): CUDA, the allocator's peak of one
step above what was allocated before it (timing.measure). CPU: the peak RSS delta
of one step in a fresh subprocess per (case, variant) -- warmed up on N = 8 so that
libraries and kernels are loaded, then VmHWM reset and one step at the case's N --
for eager and the convkernels variants (the compile variant's row has none).

    PYTHONPATH=. python benchmarks/bench_nt_xent.py [--full] [--device cuda] [--dtypes fp32,bf16]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import timing  # noqa: E402
from bench_densenet import _reset_peak_rss, _rss_kib  # noqa: E402  (the peak-RSS helpers)

BENCH = "nt_xent"
TEMPERATURE = 0.5
DIM = 128


def eager(inp):
    return common.ck.ops.reference.nt_xent_loss(inp["x"], inp["z2"], TEMPERATURE)


def fused(inp):
    return common.ck.ops.nt_xent_loss(inp["x"], inp["z2"], TEMPERATURE)


def sizes(args, device) -> list:
    if device.type == "cuda":
        return [256, 1024, 4096]
    return [256, 1024, 2048, 4096] if args.full else [256, 1024]


def make_base(n, d, dtype, device) -> dict:
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, d, generator=g)
    # The harness keys the device on "x": z1 goes by that name.
    return dict(x=z1.to(device, dtype), z2=(z1 + 0.5 * torch.randn(n, d, generator=g)).to(device, dtype),
                grad_y=torch.ones((), dtype=dtype, device=device))


def case_name(n, d, dtype) -> str:
    return "/".join([f"N{n}xD{d}", timing.DTYPE_NAMES[dtype], "nt_xent", "train", "fwd+bwd"])


def build_cases(args, device) -> list:
    cases = []
    for dtype in timing.parse_dtypes(args, device):
        for n in sizes(args, device):
            base = make_base(n, DIM, dtype, device)

            def make_inputs(base=base):
                return common.clone_inputs(base, ("x", "z2", "grad_y"), ("x", "z2"))

            cases.append(common.Case(
                bench=BENCH, case=case_name(n, DIM, dtype), make_inputs=make_inputs,
                eager=eager, fused=fused, direction="fwd+bwd", grad_mode=True, nbytes=None,
                dtype=dtype, diff=("x", "z2"), compile_key=(n, dtype),
                flops=6.0 * (2 * n) ** 2 * DIM, note=f"D={DIM}, temperature={TEMPERATURE}"))
    return cases


# ------------------------------------------------------------ CPU peak RSS
def rss_worker(n: int, d: int, dtype_name: str, backend: str) -> None:
    """Prints {"peak_mem_mb": ...}: one step's peak RSS above the RSS before it."""
    dtype = timing.DTYPES[dtype_name]
    fn = eager if backend == "eager" else fused

    def step(size):
        inp = common.clone_inputs(make_base(size, d, dtype, torch.device("cpu")),
                                  ("x", "z2", "grad_y"), ("x", "z2"))
        with common.force_backend(backend) if backend != "eager" else torch.enable_grad():
            return torch.autograd.grad(fn(inp), [inp["x"], inp["z2"]], inp["grad_y"])

    step(8)  # loads the code paths; its few KiB stay in the allocator
    inputs = make_base(n, d, dtype, torch.device("cpu"))  # alive before the reset: not counted
    del inputs
    ok = _reset_peak_rss()
    before = _rss_kib("VmRSS")
    step(n)
    peak = (_rss_kib("VmHWM") - before) / 1024 if ok else None
    print(json.dumps(dict(peak_mem_mb=peak)))


def _rss_peak(n, d, dtype, backend) -> float | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-worker",
           f"{n},{d},{timing.DTYPE_NAMES[dtype]},{backend}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    if proc.returncode != 0:
        print(f"warning: peak RSS worker failed: {proc.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_mb"]


def add_memory(rows: list, out_dir: str) -> None:
    """Fills peak_mem_mb (CPU: measured here) and mem_vs_eager into the rows and the CSV."""
    if not rows:
        return
    results = timing.ResultsCSV(out_dir, rows[0]["device"], BENCH)
    cpu = rows[0]["threads"] is not None
    eager_mem = {}
    for row in rows:
        if cpu and (row["variant"] == "eager" or row["variant"].startswith("convkernels-")):
            size, dt = row["case"].split("/")[:2]
            n, d = (int(v[1:]) for v in size.split("x"))
            backend = "eager" if row["variant"] == "eager" else row["variant"][len("convkernels-"):]
            row["peak_mem_mb"] = _rss_peak(n, d, timing.DTYPES[dt], backend)
        if row["variant"] == "eager":
            eager_mem[row["case"]] = row["peak_mem_mb"]
        base = eager_mem.get(row["case"])
        if row["peak_mem_mb"] is not None and base:
            row["mem_vs_eager"] = row["peak_mem_mb"] / base
        results.add(row)
        if row["peak_mem_mb"] is not None:
            print(f"[{BENCH}] {row['case']} {row['variant']}: peak {row['peak_mem_mb']:.1f} MiB"
                  + (f" (x{row['mem_vs_eager']:.2f} eager)" if row.get("mem_vs_eager") else ""),
                  file=sys.stderr)


def main(argv=None) -> list:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rss-worker"]:
        n, d, dt, backend = argv[1].split(",")
        rss_worker(int(n), int(d), dt, backend)
        return []
    rows = common.bench_main(__doc__.splitlines()[0], BENCH, build_cases, argv)
    out = argv[argv.index("--out") + 1] if "--out" in argv else str(timing.RESULTS_DIR)
    add_memory(rows, out)
    return rows


if __name__ == "__main__":
    main()
