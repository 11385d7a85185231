"""Backend selection, and import without the compiled extension."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import convkernels
from convkernels import backend


def _python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300)


def test_set_and_context_manager():
    assert convkernels.get_backend() == "auto"
    with convkernels.use_backend("reference"):
        assert convkernels.get_backend() == "reference"
        assert backend.resolve(torch.device("cpu")) == "reference"
    assert convkernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        convkernels.set_backend("fast")


def test_unavailable_backend_is_a_clear_error():
    with convkernels.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu"):
        convkernels.ops.add_act(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))


def test_auto_picks_compiled_cpu_kernels():
    expected = "cpu" if backend.available("cpu", "cpu") else "reference"
    assert backend.resolve(torch.device("cpu")) == expected


def test_environment_variable():
    out = _python("import convkernels; print(convkernels.get_backend())", CONVKERNELS_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    bad = _python("import convkernels", CONVKERNELS_BACKEND="nope")
    assert bad.returncode != 0 and "unknown backend 'nope'" in bad.stderr


def test_import_without_compiled_extension():
    """A missing _C warns once and falls back to the reference backend on CPU."""
    out = _python("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "convkernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import convkernels, torch
            import convkernels.nn, convkernels.cli
        print(sum("convkernels._C could not be loaded" in str(w.message) for w in caught))
        from convkernels import backend
        print(backend.resolve(torch.device("cpu")))
        x = torch.randn(2, 3, 4, 4); r = torch.randn(2, 3, 4, 4)
        print(torch.allclose(convkernels.ops.add_act(x, r), torch.relu(x + r)))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "reference", "True"]


@pytest.mark.skipif(not backend.available("cpu", "cpu"), reason="compiled CPU kernels not built")
@pytest.mark.skipif("parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's intra-op backend is not OpenMP")
def test_cpu_kernels_run_on_torch_threads():
    """The CPU kernels' loops (at::parallel_for, inlined into the extension) run
    on torch's intra-op threads: built without OpenMP they would run on one."""
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.ops.convkernels_C.parallel_threads() == n
    finally:
        torch.set_num_threads(before)


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "convkernels", "info"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for field in ("convkernels", "torch", "triton", "compiled", "device", "active"):
        assert field in out.stdout
    assert torch.__version__ in out.stdout
    if backend.available("cpu", "cpu"):
        assert "compiled    cpu" in out.stdout


def test_gpu_auto_choice_is_measured_once_per_shape(monkeypatch):
    """auto on a GPU times cuda and triton once per key and keeps the faster."""
    monkeypatch.setattr(backend, "available", lambda name, kind: True)
    monkeypatch.setattr(backend, "_TUNED", {})
    timed = []

    def fake_time(run, name):
        timed.append(name)
        return {"cuda": 2.0, "triton": 1.0}[name]

    monkeypatch.setattr(backend, "_time_ms", fake_time)
    gpu = torch.device("cuda")
    run = lambda name: None  # noqa: E731
    assert backend.resolve_tuned(gpu, ("op", 1), run) == "triton"
    assert backend.resolve_tuned(gpu, ("op", 1), run) == "triton"
    assert sorted(timed) == ["cuda", "triton"]  # measured once
    with convkernels.use_backend("cuda"):
        assert backend.resolve_tuned(gpu, ("op", 1), run) == "cuda"  # explicit choice wins
    assert backend.resolve_tuned(torch.device("cpu"), ("op", 1), run) == "cpu"
