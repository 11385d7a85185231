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
