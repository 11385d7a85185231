"""Backend selection, and import without the compiled extension."""
import os
import re
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
    monkeypatch.setattr(backend, "cuda_kernels_run_on", lambda device: True)
    monkeypatch.setattr(backend, "_TUNED", {})
    timed = []

    def fake_time(run, name, device):
        timed.append((name, device))
        return {"cuda": 2.0, "triton": 1.0}[name]

    monkeypatch.setattr(backend, "_time_ms", fake_time)
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    run = lambda name: None  # noqa: E731
    key = ("op", [1, 1], 1)  # conv arguments come as lists
    assert backend.resolve_tuned(gpu0, key, run) == "triton"
    assert backend.resolve_tuned(gpu0, key, run) == "triton"
    assert sorted(timed) == [("cuda", gpu0), ("triton", gpu0)]  # measured once
    # another device is another measurement, timed on that device
    assert backend.resolve_tuned(gpu1, key, run) == "triton"
    assert sorted(timed[2:]) == [("cuda", gpu1), ("triton", gpu1)]
    # so are other global math flags (TF32 changes the kernels both backends run)
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = not before
        backend.resolve_tuned(gpu0, key, run)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert len(timed) == 6 and len(backend._TUNED) == 3
    with convkernels.use_backend("cuda"):
        assert backend.resolve_tuned(gpu0, key, run) == "cuda"  # explicit choice wins
    assert backend.resolve_tuned(torch.device("cpu"), key, run) == "cpu"
    with pytest.raises(TypeError, match="not tensors"):
        backend.resolve_tuned(gpu0, ("op", torch.ones(1)), run)


def test_timing_runs_on_the_tensors_device(monkeypatch):
    """_time_ms records and synchronises on the device it times, not the current one."""
    entered, synced, runs = [], [], []
    current = [None]

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)
            current[0] = self.device

        def __exit__(self, *exc):
            current[0] = None

    class FakeEvent:
        def __init__(self, enable_timing):
            self.device = None

        def record(self):
            self.device = current[0]

        def synchronize(self):
            synced.append(self.device)

        def elapsed_time(self, other):
            return 10.0

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    gpu1 = torch.device("cuda", 1)
    ms = backend._time_ms(lambda name: runs.append((name, current[0])), "triton", gpu1, reps=5)
    assert ms == 2.0
    assert entered == [gpu1] and set(synced) == {gpu1}
    assert runs == [("triton", gpu1)] * 6  # warm-up + 5, all inside the device guard


triton_on_cpu = pytest.mark.skipif(not backend.available("triton", "cpu"),
                                   reason="triton not importable (interpreter)")


@triton_on_cpu
def test_tuned_choice_drives_the_conv_ops(monkeypatch):
    """The auto cuda/triton choice of conv_bn_act and bn_act_conv, driven on CPU
    tensors (the Triton interpreter stands in for the GPU): every key is hashable,
    every argument that changes the launch makes its own key, the tuning runs
    change nothing the caller sees, and the op's results are right."""
    from convkernels.ops import reference

    monkeypatch.setattr(backend, "_tunable", lambda device, impl: True)
    monkeypatch.setattr(backend, "_TUNED", {})
    seen = []

    def fake_time(run, name, device):
        if name == "triton":  # the only one runnable here; check it is side-effect free
            before = [t.clone() for t in watched]
            run(name)
            assert all(torch.equal(a, b) for a, b in zip(before, watched))
        seen.append(name)
        return {"cuda": 2.0, "triton": 1.0}[name]

    monkeypatch.setattr(backend, "_time_ms", fake_time)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g)
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.2
    rm, rv = torch.randn(16, generator=g) * 0.1, torch.rand(16, generator=g) + 0.5
    bw, bb = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    res = torch.randn(2, 16, 6, 6, generator=g)
    buf = torch.zeros(2, 24, 6, 6)
    watched = [rm, rv, buf]
    ops = convkernels.ops

    def conv_eval(**kw):
        return ops.conv_bn_act(kw.pop("x", x), kw.pop("w", w), None, rm, rv, bw, bb, False,
                               0.1, 1e-5, 1, 1, 1, 1, "relu", **kw)

    want = reference.conv_bn_act(x, w, None, rm, rv, bw, bb, False, 0.1, 1e-5, [1, 1], [1, 1],
                                 [1, 1], 1, "relu", res)
    torch.testing.assert_close(conv_eval(residual=res), want, atol=1e-4, rtol=1e-4)
    assert len(backend._TUNED) == 1
    conv_eval(residual=res)
    assert len(backend._TUNED) == 1  # the same call is not measured again
    conv_eval(residual=res, out=buf[:, 4:20])  # a channel slice adds a copy: its own key
    torch.testing.assert_close(buf[:, 4:20], want, atol=1e-4, rtol=1e-4)
    assert buf[:, :4].abs().sum() == 0 and buf[:, 20:].abs().sum() == 0
    conv_eval(residual=res.contiguous(memory_format=torch.channels_last))
    conv_eval(residual=res, w=w.contiguous(memory_format=torch.channels_last))
    conv_eval()
    assert len(backend._TUNED) == 5
    # training: its own key; the running stats are updated once, by the op
    rm0, rv0 = rm.clone(), rv.clone()
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = ops.conv_bn_act(x, w, None, rm, rv, bw, bb, True, 0.1, 1e-5, 1, 1, 1, 1, "relu")
    y_ref = reference.conv_bn_act(x, w, None, rm_ref, rv_ref, bw, bb, True, 0.1, 1e-5, [1, 1],
                                  [1, 1], [1, 1], 1, "relu", None)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)
    assert not torch.equal(rm, rm0) and not torch.equal(rv, rv0)
    assert len(backend._TUNED) == 6
    # bn_act_conv: eval and training are separate keys
    xw = torch.randn(16, 8, 1, 1, generator=g) * 0.3
    for training in (False, True):
        got = ops.bn_act_conv(x, rm[:8].clone(), rv[:8].clone(), bw[:8], bb[:8], training, 0.1, 1e-5,
                              "relu", xw, None)
        want = reference.bn_act_conv(x, rm[:8].clone(), rv[:8].clone(), bw[:8], bb[:8], training, 0.1,
                                     1e-5, "relu", xw, None, [1, 1], [0, 0], [1, 1], 1, None)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(backend._TUNED) == 8
    assert set(seen) == {"cuda", "triton"}
    assert set(backend._TUNED.values()) == {"triton"}


@triton_on_cpu
def test_tuned_choice_drives_nt_xent(monkeypatch):
    """nt_xent_loss's auto cuda/triton choice is measured once per input shape
    and grad mode (a temperature schedule does not re-measure), the timed runs
    (forward, and backward when training) leave the inputs' gradients alone,
    and the loss and gradients are the reference's."""
    from convkernels.ops import reference

    monkeypatch.setattr(backend, "_tunable", lambda device, impl: True)
    monkeypatch.setattr(backend, "_TUNED", {})
    timed = []

    def fake_time(run, name, device):
        if name == "triton":
            run(name)
        timed.append(name)
        return {"cuda": 2.0, "triton": 1.0}[name]

    monkeypatch.setattr(backend, "_time_ms", fake_time)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    for temperature in (0.5, 0.2):
        with torch.no_grad():
            torch.testing.assert_close(convkernels.ops.nt_xent_loss(z1, z2, temperature),
                                       reference.nt_xent_loss(z1, z2, temperature))
    assert len(backend._TUNED) == 1 and timed == ["cuda", "triton"]
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = convkernels.ops.nt_xent_loss(a, b, 0.5)
    assert len(backend._TUNED) == 2 and a.grad is None
    loss.backward()
    ra, rb = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    reference.nt_xent_loss(ra, rb, 0.5).backward()
    torch.testing.assert_close(a.grad, ra.grad)
    torch.testing.assert_close(b.grad, rb.grad)
    assert set(backend._TUNED.values()) == {"triton"}


def test_arch_list_coverage():
    """Machine code runs within its major version, PTX on anything newer."""
    from convkernels._extension import archs_cover

    sass, ptx = ["8.0", "9.0"], ["8.0", "9.0+PTX"]
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0)):
        assert archs_cover(sass, cap) and archs_cover(ptx, cap)
    for cap in ((10, 0), (12, 0)):  # Blackwell: only the PTX serves it
        assert not archs_cover(sass, cap) and archs_cover(ptx, cap)
    assert not archs_cover(ptx, (7, 5))
    assert archs_cover(["9.0a"], (9, 0)) and not archs_cover([], (9, 0))


def test_auto_skips_cuda_kernels_the_gpu_cannot_run(monkeypatch):
    """On a GPU _C has no code for, auto takes Triton and an explicit cuda
    backend says why it cannot run (instead of 'no kernel image' at launch)."""
    from convkernels import _extension

    monkeypatch.setattr(backend, "available", lambda name, kind: True)
    monkeypatch.setattr(_extension, "cuda_arch_list", lambda: ["8.0", "9.0"])
    monkeypatch.setattr(_extension, "_RUNS_ON", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    gpu = torch.device("cuda", 0)
    assert backend.resolve(gpu) == "triton"
    with convkernels.use_backend("cuda"), pytest.raises(RuntimeError, match="no code for cuda:0"):
        backend.resolve(gpu)
    monkeypatch.setattr(_extension, "cuda_arch_list", lambda: ["8.0", "9.0+PTX"])
    monkeypatch.setattr(_extension, "_RUNS_ON", {})
    assert backend.resolve(gpu) == "cuda"


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(not backend.has_cuda_kernels(), reason="_C built without its CUDA part")
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (it comes with triton)")
def test_built_cuda_code():
    """The built extension holds what its arch list says (sm_80 and sm_90 code,
    sm_90 PTX for newer GPUs) and was compiled without --use_fast_math."""
    from convkernels import _C, _extension

    archs = _extension.cuda_arch_list()
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert archs == ["8.0", "9.0+PTX"]
    so, tool = _C.__file__, _cuobjdump()
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", so], capture_output=True,
                             text=True, timeout=300).stdout
    for entry in archs:
        base = entry.removesuffix("+PTX").replace(".", "")
        assert f"sm_{base}" in listing, (entry, listing)
        if entry.endswith("+PTX"):
            assert f"compute_{base}" in listing or f"sm_{base}.ptx" in listing, listing
    if not any(entry.endswith("+PTX") for entry in archs):
        return  # no PTX embedded (e.g. TORCH_CUDA_ARCH_LIST=9.0): the flags cannot be read back
    ptx = subprocess.run([tool, "--dump-ptx", so], capture_output=True, text=True,
                         timeout=300).stdout
    assert "div.rn.f32" in ptx and "fma.rn.f32" in ptx  # IEEE division, denormals kept
    # --use_fast_math: approximate division, and every f32 op flushing denormals
    fast = re.findall(r"\bdiv\.(?:approx|full)\S*|\b(?:add|sub|mul|fma\.rn)\.ftz\.f32", ptx)
    assert not fast, f"built with --use_fast_math: {sorted(set(fast))}"
