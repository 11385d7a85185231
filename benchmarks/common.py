"""What the op benchmarks share: variants (eager / compile / convkernels-<backend>),
one case's correctness check and timing, and the loop over cases.

A *case* is one (shape, layout, dtype, op, mode, direction). Each bench script
describes its cases with :class:`Case` and calls :func:`run_cases`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

if __package__ in (None, ""):  # run as a script: make benchmarks/ and the repo importable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402


def import_convkernels():
    """convkernels from this checkout (PYTHONPATH or the repo root)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "_C not loaded": info() says so
        import convkernels
    return convkernels


ck = import_convkernels()
from convkernels import backend as ck_backend  # noqa: E402


@contextlib.contextmanager
def force_backend(name: str):
    """``use_backend`` for this thread *and* as the process default.

    If the backend choice is thread-local (an earlier backend.py), autograd's CUDA
    device threads running backward would see only the default: setting both makes
    the backward of a timed step run on the backend under test too.
    """
    has_default = hasattr(ck_backend, "_default")  # thread-local variant of backend.py
    prev_default = getattr(ck_backend, "_default", None)
    if has_default:
        ck_backend._default = name
    try:
        with ck_backend.use_backend(name):
            yield
    finally:
        if has_default:
            ck_backend._default = prev_default


def convkernels_backends(args, device: torch.device) -> list:
    """Backends to time: ``auto``, plus on CUDA ``triton`` and ``cuda`` when available."""
    if args.backends:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        names = ["auto"] + (["triton", "cuda"] if device.type == "cuda" else [])
    out = []
    for b in names:
        if b == "auto" or ck_backend.available(b, device.type):
            out.append(b)
        else:
            print(f"note: convkernels backend {b!r} is not available on {device.type}; skipped",
                  file=sys.stderr)
    return out


def resolved(b: str, device: torch.device) -> str:
    with ck_backend.use_backend(b):
        return ck_backend.resolve(device)


# ------------------------------------------------------------------- checks
# dtype -> (rtol, atol, fraction of elements allowed off, atol of per-channel vectors).
# atol is relative to the reference's max |value|. A few ReLU-mask flips (pre-activation
# within rounding of 0) are legitimate, and each moves the weight/bias grads of its
# channel by one term of their sum: hence the allowed fraction and the vector atol.
TOL = {torch.float32: (1e-3, 1e-3, 1e-5, 2e-2), torch.float64: (1e-6, 1e-6, 0.0, 1e-6),
       torch.bfloat16: (3e-2, 3e-2, 1e-3, 5e-2), torch.float16: (1e-2, 1e-2, 1e-3, 5e-2)}


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """None when close, else a message. Low precision allows a tiny fraction of
    elements off (activation-derivative flips at 0)."""
    if got.shape != ref.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    rtol, atol, frac, vec_atol = TOL.get(dtype, TOL[torch.float32])
    if ref.dim() <= 1:
        atol, frac = vec_atol, 0.0
    g, r = got.detach().double(), ref.detach().double()
    if not torch.isfinite(g).all():
        return f"{name}: non-finite values"
    # Scale atol by the reference's magnitude (weight/bias grads are big sums).
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    bad = (g - r).abs() > atol * scale + rtol * r.abs()
    nbad = int(bad.sum())
    if nbad > frac * r.numel() and nbad > 0:
        err = (g - r).abs().max().item()
        return f"{name}: {nbad}/{r.numel()} elements off, max abs err {err:.3g} (ref max {scale:.3g})"
    return None


# -------------------------------------------------------------------- cases
@dataclass
class Case:
    """One benchmark case.

    ``make_inputs()`` returns fresh, identical (seeded) inputs as a dict;
    ``eager(inp)`` and ``fused(inp)`` compute the output from it. ``diff``: the
    input names that get gradients (fwd+bwd: autograd.grad of the output with
    ``inp["grad_y"]``); ``state``: input names mutated in place and checked
    (running stats). ``compile_key``: cases with the same key share one
    torch.compile of ``eager`` (dynamo is reset when the key changes);
    ``compile_fn(mode)``, when given, returns that compiled callable instead (e.g.
    a compiled nn.Module with inductor freezing); ``extra["compile_note"]`` is
    added to the compile variant's note. ``nbytes`` None: no bytes /
    GB/s (compute-bound ops report ``flops``). ``untie(inp)``, when given, edits
    float64 inputs in place so that no activation input lies within rounding of
    a kink (e.g. zeroes grad_y there) and returns how many it moved (see
    :func:`_float64_verdict`).
    """
    bench: str
    case: str
    make_inputs: Callable[[], dict]
    eager: Callable[[dict], torch.Tensor]
    fused: Callable[[dict], torch.Tensor]
    direction: str  # "fwd" | "fwd+bwd"
    grad_mode: bool  # autograd recording on during forward (train) or not (eval)
    nbytes: Optional[int]
    dtype: torch.dtype
    diff: tuple = ()
    state: tuple = ()
    compile_key: tuple = ()
    note: str = ""
    flops: Optional[float] = None
    extra: dict = field(default_factory=dict)
    compile_fn: Optional[Callable[[Optional[str]], Callable]] = None
    untie: Optional[Callable[[dict], int]] = None


def _step(case: Case, f: Callable, inp: dict):
    with torch.set_grad_enabled(case.grad_mode):
        y = f(inp)
        if case.direction == "fwd+bwd":
            grads = torch.autograd.grad(y, [inp[n] for n in case.diff], inp["grad_y"])
            return (y, *grads)
    return (y,)


def _outputs_names(case: Case) -> list:
    return ["y"] + ([f"grad_{n}" for n in case.diff] if case.direction == "fwd+bwd" else [])


def _check(case: Case, name: str, f: Callable, ref_out, ref_inp) -> Optional[str]:
    inp = case.make_inputs()
    out = _step(case, f, inp)
    timing.synchronize(inp["x"].device)
    msgs = [compare(n, g, r, case.dtype) for n, g, r in zip(_outputs_names(case), out, ref_out)]
    msgs += [compare(s, inp[s], ref_inp[s], torch.float32) for s in case.state]
    msgs = [m for m in msgs if m]
    return f"{name} != eager on {case.bench} {case.case}: " + "; ".join(msgs) if msgs else None


def _converted(inp: dict, dtype: torch.dtype) -> dict:
    """``inp`` with its floating tensors cast to ``dtype`` (fresh leaves)."""
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad)
                if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in inp.items()}


def _further_from_float64(case: Case, f: Callable, b: str, base: dict) -> Optional[str]:
    """None when f's outputs and state, on inputs ``base``, are each no further
    from eager run in float64 than eager fp32 is (max abs error, 1.5x slack), else
    what is further."""
    def run(fn, dtype, backend=None):
        inp = _converted(base, dtype)
        with force_backend(backend) if backend else contextlib.nullcontext():
            out = _step(case, fn, inp)
        return list(out) + [inp[s] for s in case.state]

    try:
        ref = run(case.eager, torch.float64)
    except Exception as e:  # an eager that does not run in float64
        return f"no float64 reference ({type(e).__name__}: {e})"
    eager, ours = run(case.eager, torch.float32), run(f, torch.float32, b)
    worse = []
    for n, o, e, r in zip(_outputs_names(case) + list(case.state), ours, eager, ref):
        err_o = (o.detach().double() - r.detach()).abs().max().item()
        err_e = (e.detach().double() - r.detach()).abs().max().item()
        if err_o > 1.5 * err_e + 1e-12:
            worse.append(f"{n}: {err_o:.3g} off float64, eager {err_e:.3g}")
    return "; ".join(worse) or None


def _float64_verdict(case: Case, f: Callable, b: str) -> tuple:
    """When convkernels variant ``f`` and eager disagree in fp32: is ``f`` the one
    off? Returns ``(worse, how)``: ``worse`` None when float64 sides with ``f``
    (training BN over large batches is where fp32 eager can be the one off: its
    reductions sum in fp32, ours in double), else what is further; ``how`` notes
    how the verdict was reached.

    An activation input within rounding of its kink (a ReLU "tie") may land on
    either side in any fp32 code, moving one term of the gradients by O(1); which
    side eager picks is luck. When ``case.untie`` is given and ``f`` is off on
    the case's inputs, the verdict is taken again on inputs with the ties taken
    out, so that a tie cannot pass for a defect, nor hide one elsewhere.
    """
    if case.dtype != torch.float32:
        return "no float64 arbitration below fp32", ""
    base = case.make_inputs()
    worse = _further_from_float64(case, f, b, base)
    if worse is None or case.untie is None:
        return worse, ""
    base64 = _converted(base, torch.float64)
    ties = case.untie(base64)
    if not ties:
        return worse, ""
    # fp32 inputs rounded from the untied ones; the float64 run sees the same values.
    worse_untied = _further_from_float64(case, f, b, _converted(base64, torch.float32))
    return worse_untied, f"after taking out {ties} activation ties"


class CompileCache:
    """One torch.compile'd eager function per compile_key."""

    def __init__(self, mode: Optional[str]):
        self.mode, self.key, self.fn = mode, None, None

    def get(self, case: Case) -> Callable:
        if case.compile_key != self.key:
            torch._dynamo.reset()
            self.key = case.compile_key
            if case.compile_fn is not None:
                self.fn = case.compile_fn(self.mode)
            else:
                self.fn = torch.compile(case.eager, dynamic=False, mode=self.mode)
        return self.fn


def run_cases(cases: list, args, device: torch.device, threads: int, bench: str) -> list:
    """Checks and times every case's variants; writes rows to the results CSV.
    Returns the rows."""
    dev_name = timing.device_name(device, threads)
    peak = timing.peak_gbps(device, args.peak_gbps)
    results = timing.ResultsCSV(args.out, dev_name, bench, fresh=args.fresh)
    backends = convkernels_backends(args, device)
    compiler = None if args.no_compile else CompileCache(args.compile_mode)
    compile_name = "compile" if not args.compile_mode else f"compile-{args.compile_mode}"
    progress = timing.Progress(bench, len(cases))
    print(f"[{bench}] {len(cases)} cases on {dev_name}; convkernels backends: "
          + ", ".join(f"{b}->{resolved(b, device)}" for b in backends)
          + f"; results -> {results.path}", file=sys.stderr)
    rows = []
    for case in cases:
        progress.start(case.case)
        # Reference outputs and state.
        ref_inp = case.make_inputs()
        ref_out = _step(case, case.eager, ref_inp)
        variants = [("eager", "", case.eager, None)]
        if compiler is not None:
            variants.append((compile_name, "", compiler.get(case), None))
        for b in backends:
            variants.append((f"convkernels-{b}", resolved(b, device), case.fused, b))
        # Correctness once per case, before timing (compiles the compile variant).
        timed = []
        for name, be, f, b in variants:
            note = case.note
            if name != "eager":
                t0 = time.perf_counter()
                with force_backend(b) if b else contextlib.nullcontext():
                    msg = _check(case, name, f, ref_out, ref_inp)
                if msg and b:
                    worse, how = _float64_verdict(case, f, b)
                    if worse:
                        raise AssertionError(f"{msg} ({worse}" + (f"; {how}" if how else "") + ")")
                    verdict = " ".join(filter(None, ("eager further from float64", how)))
                    print(f"note: {msg}; {verdict}", file=sys.stderr)
                    note = (note + "; " if note else "") + verdict
                elif msg:  # torch.compile differing from eager is worth a note, not a stop
                    print(f"warning: {msg}", file=sys.stderr)
                    note = (note + "; " if note else "") + "MISMATCH vs eager"
                if name.startswith("compile"):
                    note = "; ".join(n for n in (note, case.extra.get("compile_note")) if n)
                    note = (note + "; " if note else "") + f"first call {time.perf_counter() - t0:.1f}s"
            timed.append((name, be, f, b, note))
        del ref_out, ref_inp
        # Timing: the variants take turns, ``rounds`` times, so that a change of
        # machine load hits all of them alike; the quantiles pool every round.
        inp = case.make_inputs()
        rounds = max(1, args.rounds)
        mrt = args.min_run_time or (0.1 if device.type == "cuda" else 0.15)
        times = {t[0]: [] for t in timed}
        extra = {}
        for rnd in range(rounds):
            for name, be, f, b, note in timed:
                with force_backend(b) if b else contextlib.nullcontext():
                    st = timing.measure(lambda: _step(case, f, inp), device, min_run_time=mrt,
                                        threads=threads, raw=True, warmup=3 if rnd == 0 else 1,
                                        min_samples=max(2, 6 // rounds))
                times[name] += st["times_s"]
                extra[name] = st.get("peak_mem_mb")
        eager_ms = None
        summary = []
        for name, be, f, b, note in timed:
            stats = timing.summarize(times[name])
            stats["peak_mem_mb"] = extra[name]
            if name == "eager":
                eager_ms = stats["median_ms"]
            row = timing.make_row(bench, case.case, name, stats, backend=be, nbytes=case.nbytes,
                                  flops=case.flops, eager_ms=eager_ms, peak=peak, device=dev_name,
                                  threads=threads if device.type == "cpu" else None, note=note)
            results.add(row)
            rows.append(row)
            summary.append(f"{name} {stats['median_ms']:.3f}ms"
                           + (f" x{eager_ms / stats['median_ms']:.2f}" if name != "eager" else ""))
        progress.step(f"{case.case}: " + ", ".join(summary))
    print(f"[{bench}] done in {progress.elapsed():.0f}s -> {results.path}", file=sys.stderr)
    return rows


def case_grid(entries, args, device: torch.device, make_base: Callable, layouts=None, dtypes=None):
    """Yields ``(entry, layout, dtype, base)`` for every entry x layout x dtype.

    ``base()`` returns ``make_base(entry, layout, dtype, device)`` (the random
    tensors the cases of that triple clone), built on first use; only one
    triple's tensors are alive at a time. ``layouts`` / ``dtypes`` default to
    the ``--layouts`` / ``--dtypes`` options.
    """
    cache: dict = {}
    layouts = timing.parse_layouts(args) if layouts is None else layouts
    dtypes = timing.parse_dtypes(args, device) if dtypes is None else dtypes
    for entry in entries:
        for layout in layouts:
            for dtype in dtypes:
                key = (entry, layout, dtype)

                def base(key=key):
                    if key not in cache:
                        cache.clear()  # one triple's tensors alive at a time
                        cache[key] = make_base(*key, device)
                    return cache[key]

                yield entry, layout, dtype, base


def shape_grid(args, device: torch.device, make_base: Callable):
    """:func:`case_grid` over the BN-layer shapes of ``--shapes`` / ``--full`` / ``--batch``
    (shapes.select): yields ``(shape, numel, layout, dtype, base)``."""
    import shapes as shapes_mod

    entries = [tuple(e["shape"]) for e in shapes_mod.select(args)]
    for shape, layout, dtype, base in case_grid(entries, args, device, make_base):
        yield shape, numel(shape), layout, dtype, base


def clone_inputs(base: dict, names, requires_grad=()) -> dict:
    """Fresh clones of ``base[n]`` for n in names; those in ``requires_grad`` require grad."""
    inp = {n: base[n].clone() for n in names}
    for n in requires_grad:
        inp[n].requires_grad_(True)
    return inp


def bench_main(description: str, bench: str, build_cases: Callable, argv=None,
               add_args: Optional[Callable] = None) -> list:
    """A bench script's ``main``: shared options (plus ``add_args(parser)``), setup,
    ``build_cases(args, device)``, :func:`run_cases`. Returns the rows."""
    import argparse

    ap = timing.common_args(argparse.ArgumentParser(description=description))
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args(argv)
    device, threads = timing.setup(args)
    cases = build_cases(args, device)
    return run_cases(cases, args, device, threads, bench)


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def randn(shape, dtype, device, layout, *, scale=1.0, shift=0.0, gen=None) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu") * scale + shift
    return timing.to_layout(t.to(device=device, dtype=dtype), layout)
