"""Ahead-of-time compilation of every kernel specialisation for a GPU target.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
runs the whole pipeline down to PTX and cubin (ptxas ships with Triton). Used by
``tests/test_triton_compile.py``; also a CLI::

    python -m convkernels.triton_kernels.aot [--arch 80 90] [--jobs N] [--json OUT]

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` yields interpreter objects that cannot
be compiled, so the CLI must run with the variable unset (the test takes care of it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import inspect
import json
import multiprocessing
import os
import sys
import time

# Shared-memory limit per block (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _unwrap(fn):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction):
        fn = fn.fn
        seen += 1
        if seen > 8:
            raise TypeError(f"not a triton kernel: {fn!r}")
    return fn


def make_source(case):
    """ASTSource for a CompileCase, for the installed Triton's signature format."""
    from triton.compiler import ASTSource

    fn = _unwrap(case.fn)
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.2: constexprs listed in the signature too
        return ASTSource(fn=fn, signature=dict(case.signature), constexprs=dict(case.constexprs))
    # older format: signature without constexprs, constants keyed by index
    sig = {fn.arg_names.index(k): v for k, v in case.signature.items() if v != "constexpr"}
    consts = {fn.arg_names.index(k): v for k, v in case.constexprs.items()}
    return ASTSource(fn=fn, signature=sig, constants=consts)


@functools.lru_cache(maxsize=None)
def _cases_by_name():
    from . import compile_cases

    cases = compile_cases()
    by_name = {c.name: c for c in cases}
    if len(by_name) != len(cases):
        raise ValueError("duplicate CompileCase names")
    return by_name


def case_names():
    return list(_cases_by_name())


def compile_one(name: str, arch: int) -> dict:
    """Compile one case for sm_<arch>; a JSON-able result (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    try:
        case = _cases_by_name()[name]
        k = triton.compile(make_source(case), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        md = k.metadata
        return dict(name=name, arch=arch, ok=True, shared=int(md.shared),
                    num_warps=int(md.num_warps), ptx=len(k.asm.get("ptx", "")),
                    cubin=len(k.asm.get("cubin", b"")), seconds=time.perf_counter() - t0)
    except Exception as e:  # reported per case by the test
        return dict(name=name, arch=arch, ok=False, error=f"{type(e).__name__}: {e}",
                    seconds=time.perf_counter() - t0)


def compile_all(archs=(80, 90), jobs=None) -> list:
    """Compile every case for every arch, in parallel worker processes."""
    jobs = jobs or os.cpu_count() or 1
    work = [(n, a) for n in case_names() for a in archs]
    if jobs <= 1:
        return [compile_one(n, a) for n, a in work]
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as ex:
        return list(ex.map(compile_one, *zip(*work), chunksize=4))


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = compile_all(tuple(a.arch), a.jobs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)
    bad = [r for r in res if not r["ok"] or r["shared"] > SHARED_LIMIT.get(r["arch"], 0)]
    for r in bad:
        print("FAIL", r["name"], r["arch"], r.get("error", f"shared={r.get('shared')}"))
    print(f"{len(res)} compiles, {len(bad)} failed, {time.perf_counter() - t0:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
