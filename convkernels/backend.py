"""Backend choice: which implementation runs the fused ops.

* ``reference``: composites of aten ops, the semantic definition of each op.
* ``cpu``: C++ kernels of convkernels._C (CPU tensors).
* ``cuda``: CUDA C++ kernels of convkernels._C (CUDA tensors).
* ``triton``: Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
* ``auto`` (default): the fastest available for the tensor's device.

Set it with :func:`set_backend`, the :func:`use_backend` context manager, or the
environment variable ``CONVKERNELS_BACKEND``. The backend is resolved once per
op call, when the forward runs (under ``torch.compile``: when the graph is
traced), and the backward of that call runs on the same backend.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import _extension
from ._extension import HAS_C, cuda_kernels_run_on, has_cuda_kernels

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"convkernels: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_current = _check_name(os.environ.get("CONVKERNELS_BACKEND", "auto"))


def get_backend() -> str:
    """The backend requested (may be ``"auto"``)."""
    return _current


def set_backend(name: str) -> None:
    """Select the backend for the whole process."""
    global _current
    _current = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed ops on backend ``name``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_available(device_type: str) -> bool:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton_importable()


@functools.lru_cache(None)
def _triton_importable() -> bool:
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def available(name: str, device_type: str) -> bool:
    """Whether backend ``name`` can run tensors on ``device_type``."""
    if name == "reference":
        return True
    if name == "cpu":
        return HAS_C and device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda" and has_cuda_kernels()
    if name == "triton":
        return triton_available(device_type)
    return False


_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def recording_for_export() -> bool:
    """Whether a graph is being recorded for export. torch.export (which the
    ONNX exporter runs) keeps each public op as one node; its decomposition
    (``run_decompositions``, which the ONNX exporter runs) is the op's body
    traced here. torch.jit.trace cannot record the public ops (their ``int[2]``
    arguments), so their wrappers run the body under it. Either way the body
    must be the reference composite: standard aten ops (Conv,
    BatchNormalization, Relu, ... in ONNX) that run without convkernels, with
    dynamic shapes. torch.compile is not export: it keeps the fused kernels."""
    return _exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def resolve(device: torch.device) -> str:
    """The concrete backend that runs tensors on ``device`` (``reference``
    while a graph is recorded for export: see :func:`recording_for_export`)."""
    if recording_for_export():
        return "reference"
    name = get_backend()
    kind = device.type
    if name == "auto":
        if kind == "cpu":
            return "cpu" if available("cpu", kind) else "reference"
        for candidate in ("cuda", "triton"):
            if available(candidate, kind) and (candidate != "cuda" or cuda_kernels_run_on(device)):
                return candidate
        return "reference"
    if name == "cuda" and available(name, kind) and not cuda_kernels_run_on(device):
        cap = torch.cuda.get_device_capability(device)
        raise RuntimeError(
            f"convkernels: backend 'cuda' has no code for {device} (compute capability "
            f"{cap[0]}.{cap[1]}): convkernels._C was built for TORCH_CUDA_ARCH_LIST="
            f"{';'.join(_extension.cuda_arch_list())!r}; rebuild with that GPU in the list "
            "(or use the triton backend)")
    if not available(name, kind):
        hint = {
            "cpu": "it needs convkernels._C and CPU tensors",
            "cuda": "it needs convkernels._C built with CUDA and CUDA tensors",
            "triton": "it needs triton and CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)",
        }[name]
        raise RuntimeError(
            f"convkernels: backend {name!r} cannot run {kind} tensors here: {hint}"
        )
    return name


def kernels(name: str):
    """The primitives (see convkernels.ops.primitives) of native backend ``name``."""
    if name in ("cpu", "cuda"):
        from .ops.primitives import CompiledKernels

        return CompiledKernels()
    if name == "triton":
        from . import triton_kernels

        return triton_kernels
    raise ValueError(f"convkernels: backend {name!r} has no kernel primitives")


# Per-shape choice between the two GPU backends: {key: backend name}.
_TUNED: dict = {}


def _frozen(v):
    """``v`` with lists (conv arguments) as tuples, so that it can be a dict key."""
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(e) for e in v)
    if isinstance(v, torch.Tensor):
        raise TypeError("convkernels: a tuning key holds tensors' shapes and strides, not tensors")
    return v


def tensor_key(t) -> tuple | None:
    """What of a tensor argument changes which backend is faster: shape,
    strides (layout, channel slices) and dtype."""
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype)


def _math_flags() -> tuple:
    """Global flags that change the kernels the GPU backends run (TF32, cuDNN)."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
            torch.get_float32_matmul_precision())


def _time_ms(run, name: str, device: torch.device, reps: int = 5) -> float:
    """Mean time of ``run(name)`` on ``device`` (events and syncs on that
    device's current stream, not the current device's)."""
    with torch.cuda.device(device):
        run(name)  # warm-up: Triton compiles and autotunes its kernels here
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            run(name)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps


def _tunable(device: torch.device, impl: str) -> bool:
    """Whether an ``auto`` call on ``device`` chooses between cuda and triton."""
    return (get_backend() == "auto" and device.type == "cuda" and impl == "cuda"
            and available("triton", "cuda") and not torch.compiler.is_compiling())


def resolve_tuned(device: torch.device, key: tuple, run) -> str:
    """Like :func:`resolve`, but with ``auto`` on a GPU where both ``cuda`` and
    ``triton`` can run, the faster of the two for this call, measured once per
    ``key`` and cached. ``key`` names the op and every argument that changes the
    launch (see :func:`tensor_key`); the device and the global math flags are
    added here. ``run(name)`` must compute the op on backend ``name`` without
    side effects. While ``torch.compile`` traces, nothing is measured and the
    default order applies."""
    impl = resolve(device)
    if not _tunable(device, impl):
        return impl
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    full = (str(device), _math_flags(), _frozen(key))
    choice = _TUNED.get(full)
    if choice is None:
        with torch.no_grad():
            choice = min(("cuda", "triton"), key=lambda name: _time_ms(run, name, device))
        _TUNED[full] = choice
    return choice
