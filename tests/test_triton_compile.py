"""Ahead-of-time compile of every Triton kernel specialisation for sm_80 and sm_90.

No GPU needed: GPU-only compile failures (layouts, shared memory, ptxas) show up
here. The cases come from one table, ``convkernels.triton_kernels.compile_cases()``,
to which every kernel module contributes (every tile config, every activation,
fp32/fp16/bf16, the residual/scale/grad flags). The compiles run in one
subprocess with TRITON_INTERPRET unset (interpreted kernels cannot be compiled;
conftest sets it on CPU-only machines), in parallel over the CPU cores.
"""
import json
import os
import subprocess
import sys
import time

import pytest

triton = pytest.importorskip("triton")

try:
    from triton.backends import backends as _triton_backends
except Exception:  # pragma: no cover
    _triton_backends = {}
if "nvidia" not in _triton_backends:
    pytest.skip("triton has no nvidia backend", allow_module_level=True)

import convkernels  # noqa: E402
import convkernels.triton_kernels as tk  # noqa: E402
from convkernels.triton_kernels import aot  # noqa: E402
from convkernels.triton_kernels import activations  # noqa: E402

pytestmark = pytest.mark.xdist_group("triton_aot")  # one compile subprocess for every case
ARCHS = (80, 90)
CASES = tk.compile_cases()
CASE_NAMES = [c.name for c in CASES]
TIMEOUT_S = int(os.environ.get("CONVKERNELS_AOT_TIMEOUT", "1200"))


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    """{(case name, arch): result} from one `python -m ...aot` subprocess."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(convkernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-W", "ignore", "-m", "convkernels.triton_kernels.aot",
           "--json", str(out), "--arch", *map(str, ARCHS)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if not out.exists():
        pytest.fail(f"aot subprocess failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    res = {(r["name"], r["arch"]): r for r in json.loads(out.read_text())}
    print(f"\naot: {len(res)} compiles in {time.perf_counter() - t0:.1f} s")
    return res


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("name", CASE_NAMES)
def test_compiles(aot_results, name, arch):
    r = aot_results.get((name, arch))
    assert r is not None, f"{name} was not compiled for sm_{arch}"
    assert r["ok"], r["error"]
    assert r["cubin"] > 0 and r["ptx"] > 0
    limit = aot.SHARED_LIMIT[arch]
    assert r["shared"] <= limit, f"{name}: {r['shared']} B shared > {limit} B on sm_{arch}"


def _kernels():
    """Every top-level kernel (``*_kernel``) defined in the kernel modules."""
    found = {}
    for mod in tk._KERNEL_MODULES:
        for attr, obj in vars(mod).items():
            if attr.endswith("_kernel") and hasattr(obj, "arg_names"):
                found[attr] = obj
    return found


def test_table_covers_every_kernel():
    in_table = {c.name.split("[")[0] for c in CASES}
    missing = set(_kernels()) - in_table
    assert not missing, f"kernels absent from compile_cases(): {sorted(missing)}"


@pytest.mark.parametrize("kernel", sorted(_kernels()))
def test_table_covers_acts_and_dtypes(kernel):
    cases = [c for c in CASES if c.name.split("[")[0] == kernel]
    if "ACT" in _kernels()[kernel].arg_names:
        acts = {c.constexprs["ACT"] for c in cases}
        assert acts == set(activations.ACT_CODES.values()), f"{kernel}: acts {acts}"
    if "x_ptr" in _kernels()[kernel].arg_names:
        dts = {c.signature["x_ptr"] for c in cases}
        assert {"*fp32", "*fp16", "*bf16"} <= dts, f"{kernel}: dtypes {dts}"


def test_case_names_unique():
    assert len(set(CASE_NAMES)) == len(CASE_NAMES)


def test_table_covers_int64_offsets():
    """The conv kernels compile with int64 offsets too, with int32 strides (the
    products overflow) and with int64 strides (a stride >= 2**31)."""
    for kernel in ("_conv_gemm_kernel", "_conv_direct_kernel"):
        cases = [c for c in CASES if c.name.split("[")[0] == kernel]
        assert {c.constexprs["IDX64"] for c in cases} == {False, True}, kernel
        wide = [c for c in cases if c.constexprs["IDX64"]]
        assert {c.signature["sxh"] for c in wide} == {"i32", "i64"}, kernel
