"""Loads the compiled extension convkernels._C, if it was built.

Without it the package still works: CPU tensors run the reference backend and
CUDA tensors the Triton backend. One warning says so.
"""
from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.convkernels_C.*)

    HAS_C = True
    _IMPORT_ERROR = None
except ImportError as e:  # not built, or built against another torch
    HAS_C = False
    _IMPORT_ERROR = e
    warnings.warn(
        f"convkernels._C could not be loaded ({e}); falling back to the triton and "
        "reference backends. Rebuild with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cuda_kernels() -> bool:
    """True when _C was built with its CUDA part."""
    if not HAS_C:
        return False
    op = torch.ops.convkernels_C.channel_stats.default
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")


def cuda_arch_list() -> list[str]:
    """The TORCH_CUDA_ARCH_LIST entries _C's CUDA part was built for, e.g.
    ``["8.0", "9.0+PTX"]`` (empty without a CUDA part)."""
    if not has_cuda_kernels():
        return []
    return [a for a in torch.ops.convkernels_C.cuda_arch_list().replace(" ", ";").split(";") if a]


def archs_cover(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` runs on a GPU of compute ``capability``:
    machine code for X.y runs on X.z with z >= y (same major only); PTX for X.y
    is compiled by the driver for any capability >= X.y."""
    major, minor = capability
    for entry in archs:
        ptx = entry.endswith("+PTX")
        base = entry[:-4] if ptx else entry
        a_major, a_minor = (int(v) for v in base.rstrip("a").split("."))
        if (major == a_major and minor >= a_minor) or (ptx and (major, minor) >= (a_major, a_minor)):
            return True
    return False


def cuda_kernels_run_on(device: torch.device) -> bool:
    """True when _C has CUDA code that ``device``'s GPU can run (checked once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _RUNS_ON:
        _RUNS_ON[index] = archs_cover(cuda_arch_list(), torch.cuda.get_device_capability(index))
    return _RUNS_ON[index]


_RUNS_ON: dict = {}
