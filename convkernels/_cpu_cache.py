"""The CPU block cache of fused inference forwards (csrc/cpu/block_cache.cpp).

A fused forward (``convkernels.optimize``, ``convkernels.models``) called
without autograd opens a cache scope on its thread for the whole call, nested
fused forwards included. There, CPU allocations of 128 KiB or more reuse
blocks that earlier tensors freed, instead of going back to malloc, whose
returned memory the next forward would fault in again page by page (what ONNX
Runtime's arena avoids). Only freed blocks are reused: a tensor that is still
held (a model output, a feature map a hook kept, a view of one) keeps its
memory, so results are the same with and without the cache.

The cache keeps at most ``limit`` bytes of free blocks (1 GiB by default;
:func:`set_cpu_cache_limit`); :func:`convkernels.clear_caches` frees them, and
``CONVKERNELS_CPU_CACHE=0`` in the environment, read when ``convkernels._C``
loads, leaves torch's CPU allocator alone. Outside a scope, and for smaller
allocations, the allocator that was there before serves every request.
No scope is opened while torch.compile, torch.jit or a dispatch mode traces.

Measured (2-core Xeon VM, fp32, 224x224, channels_last, ``optimize``d
torchvision densenet121, eval batch 8, median of 20 forwards): 236 ms with the
cache off, 202 ms on; page faults a forward 23.5k -> 0.2 (README, "Caches").
"""
from __future__ import annotations

import threading

import torch

from . import _extension
from .ops._fold import on_clear
from .ops._library import plain_eager

_local = threading.local()


def enter() -> bool:
    """Opens this thread's cache scope if the call is an eager one without
    autograd and none is open; True when it did (the caller must :func:`exit`)."""
    if (getattr(_local, "open", False) or torch.is_grad_enabled() or not _extension.HAS_C
            or torch.jit.is_tracing() or not plain_eager()):
        return False
    torch.ops.convkernels_C.cpu_cache_enter()
    _local.open = True
    return True


def exit() -> None:  # noqa: A001  (the pair of enter)
    _local.open = False
    torch.ops.convkernels_C.cpu_cache_exit()


def cpu_cache_info() -> dict:
    """The cache's state: ``installed`` (whether it is torch's CPU allocator),
    ``free_bytes`` (cached blocks), ``used_bytes`` (blocks backing live
    tensors), ``hits`` and ``misses`` (scope allocations served from the cache
    or not, since the process started) and ``limit`` (bytes of free blocks it
    keeps)."""
    if not _extension.HAS_C:
        return dict(installed=False, free_bytes=0, used_bytes=0, hits=0, misses=0, limit=0)
    keys = ("installed", "free_bytes", "used_bytes", "hits", "misses", "limit")
    info = dict(zip(keys, torch.ops.convkernels_C.cpu_cache_stats()))
    info["installed"] = bool(info["installed"])
    return info


def set_cpu_cache_limit(limit: int) -> int:
    """Keep at most ``limit`` bytes of free blocks (0: free every block when its
    tensor goes); frees the blocks above it. Returns the previous limit."""
    if not _extension.HAS_C:
        raise RuntimeError("set_cpu_cache_limit: convkernels._C is not built, there is no cache")
    return torch.ops.convkernels_C.cpu_cache_set_limit(int(limit))


def _flush() -> None:
    if _extension.HAS_C:
        torch.ops.convkernels_C.cpu_cache_flush()


on_clear(_flush)
