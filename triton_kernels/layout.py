"""Layout, tiling and grid helpers shared by the Triton kernels.

Every 4-D ``[N, C, H, W]`` tensor is addressed as ``[N, C, HW]`` with strides
``(sN, sC, sHW)``, which covers both layouts the contract allows:

* NCHW-contiguous:         ``(C*HW, HW, 1)``
* channels_last-contiguous: ``(HW*C, 1, C)``

Kernels work on ``[BLOCK_C, BLOCK_HW]`` tiles of one sample. A stride equal to 1
is specialised by Triton's JIT into a compile-time constant, so the tile is
contiguous (and vectorised) along HW for NCHW and along C for channels_last.
The tile shape is picked by a deterministic heuristic from the fixed table
``TILES``; every entry of that table is compiled ahead of time by
``tests/test_triton_compile.py`` (see ``CompileCase``).

Reductions (per-channel over N, H, W) are two-stage and deterministic: a grid of
``(channel blocks, splits)`` programs each reduces a contiguous range of tiles
into a ``[splits, C]`` workspace, which a second, tiny pass combines in a fixed
order. No atomics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype (of the per-channel vectors) for a tensor of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_vec(v: torch.Tensor, length: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A contiguous 1-D vector of ``length`` elements in ``dtype`` (converted if needed)."""
    if v.dim() != 1 or v.numel() != length:
        raise ValueError(f"convkernels: {name} must have shape [{length}], got {tuple(v.shape)}")
    if v.dtype != dtype or not v.is_contiguous():
        v = v.to(dtype).contiguous()
    return v


# ----------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    N: int
    C: int
    HW: int
    channels_last: bool

    @property
    def strides(self):
        """(sN, sC, sHW) of the [N, C, HW] view."""
        if self.channels_last:
            return (self.HW * self.C, 1, self.C)
        return (self.C * self.HW, self.HW, 1)

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format


def _check_4d(x: torch.Tensor, name: str):
    if x.dim() != 4:
        raise ValueError(f"convkernels: {name} must be 4-D [N, C, H, W], got {x.dim()}-D")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"convkernels: unsupported dtype {x.dtype} for {name}")


def layout_of(x: torch.Tensor):
    """(x, Layout) with x dense NCHW or channels_last (copied if neither)."""
    _check_4d(x, "x")
    N, C, H, W = x.shape
    HW = H * W
    nchw = x.is_contiguous()
    cl = x.is_contiguous(memory_format=torch.channels_last)
    if not (nchw or cl):
        x = x.contiguous()
        nchw = True
    # Both at once only when C == 1 or HW == 1 (same memory either way): tile
    # along the dimension that is long.
    channels_last = cl and not (nchw and (HW > 1 or C == 1))
    return x, Layout(N, C, HW, channels_last)


def conform(t: torch.Tensor, x: torch.Tensor, lay: Layout, name: str) -> torch.Tensor:
    """``t`` checked against x (shape, dtype, device) and made dense in x's layout."""
    _check_4d(t, name)
    if t.shape != x.shape:
        raise ValueError(f"convkernels: {name} shape {tuple(t.shape)} != x shape {tuple(x.shape)}")
    if t.dtype != x.dtype or t.device != x.device:
        raise TypeError(f"convkernels: {name} must have x's dtype and device")
    if not t.is_contiguous(memory_format=lay.memory_format):
        t = t.contiguous(memory_format=lay.memory_format)
    return t


def empty_out(x: torch.Tensor, lay: Layout) -> torch.Tensor:
    y = torch.empty_like(x)
    if not y.is_contiguous(memory_format=lay.memory_format):  # never for dense x
        y = torch.empty_like(x, memory_format=lay.memory_format)
    return y


# ----------------------------------------------------------------------------
# tiles and grids
# ----------------------------------------------------------------------------

TILE_ELEMS = 2048
# (BLOCK_C, BLOCK_HW): BLOCK_C from 2 to 256, BLOCK_C * BLOCK_HW == TILE_ELEMS.
TILES = tuple((1 << k, TILE_ELEMS >> k) for k in range(1, 9))
TILE_WARPS = 4


def pick_tile(lay: Layout):
    """(BLOCK_C, BLOCK_HW, num_warps) for a layout: long along the contiguous dim."""
    if lay.channels_last:
        block_c = min(max(triton.next_power_of_2(lay.C), TILES[0][0]), TILES[-1][0])
        block_hw = TILE_ELEMS // block_c
    else:
        block_hw = min(max(triton.next_power_of_2(lay.HW), TILES[-1][1]), TILES[0][1])
        block_c = TILE_ELEMS // block_hw
    return block_c, block_hw, TILE_WARPS


def elementwise_grid(lay: Layout, block_c: int, block_hw: int):
    """Grid (N * hw_blocks, c_blocks) and hw_blocks, for the tile_2d helper."""
    hw_blocks = triton.cdiv(lay.HW, block_hw)
    return (lay.N * hw_blocks, triton.cdiv(lay.C, block_c)), hw_blocks


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the CPU interpreter: a few splits still exercise the merge


@dataclasses.dataclass(frozen=True)
class ReducePlan:
    block_c: int
    block_hw: int
    num_warps: int
    hw_blocks: int
    total_tiles: int
    tiles_per_split: int
    splits: int
    c_blocks: int

    @property
    def grid(self):
        return (self.c_blocks, self.splits)


def reduce_plan(lay: Layout, device: torch.device) -> ReducePlan:
    """Split of the N * hw_blocks tiles of every channel block over programs."""
    block_c, block_hw, warps = pick_tile(lay)
    hw_blocks = triton.cdiv(lay.HW, block_hw)
    total = lay.N * hw_blocks
    c_blocks = triton.cdiv(lay.C, block_c)
    splits = max(1, min(total, triton.cdiv(_target_programs(device), c_blocks)))
    per = triton.cdiv(total, splits)
    splits = triton.cdiv(total, per)  # no empty split
    return ReducePlan(block_c, block_hw, warps, hw_blocks, total, per, splits, c_blocks)


def device_guard(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


@triton.jit
def tile_2d(tile, pid_c, hw_blocks, C, HW, sN, sC, sHW,
            BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and masks of tile number ``tile`` (= n * hw_blocks + hw_block) of
    channel block ``pid_c``: returns (n, c, c_mask, offs, mask, n_valid_hw)."""
    n = tile // hw_blocks
    hw0 = (tile - n * hw_blocks) * BLOCK_HW
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = hw0 + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    mask = c_mask[:, None] & (hw < HW)[None, :]
    # int64 throughout: one sample may span 2**31 elements (c * sC alone can);
    # the kernels using tiles are memory-bound, so the wider address math is free.
    offs = n.to(tl.int64) * sN + (c.to(tl.int64)[:, None] * sC + hw.to(tl.int64)[None, :] * sHW)
    n_valid = tl.minimum(HW - hw0, BLOCK_HW)
    return n, c, c_mask, offs, mask, n_valid


# ----------------------------------------------------------------------------
# ahead-of-time compile table (used by tests/test_triton_compile.py)
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation: ``ASTSource(fn, signature, constexprs)``."""

    name: str
    fn: object  # triton JITFunction
    signature: dict  # arg name -> "*fp32", "i32", ... or "constexpr"
    constexprs: dict  # arg name -> value
    num_warps: int
    num_stages: int = 3


def case_signature(fn, ptr_types: dict, consts: dict, unit=()):
    """(signature, constexprs) of ``fn``: ``consts`` and the args in ``unit`` (the
    strides the JIT sees as 1, made the constexpr 1 as at run time) are constexprs,
    ``*_ptr`` args take their type from ``ptr_types``, other args are "i32"."""
    sig, cx = {}, {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg], cx[arg] = "constexpr", consts[arg]
        elif arg in unit:
            sig[arg], cx[arg] = "constexpr", 1
        elif arg.endswith("_ptr"):
            sig[arg] = ptr_types[arg]
        else:
            sig[arg] = "i32"
    extra = set(consts) - set(fn.arg_names)
    if extra:
        raise ValueError(f"{fn.__name__}: unknown constexprs {extra}")
    return sig, cx


def make_case(fn, label: str, ptr_types: dict, consts: dict, *, layout: str,
              num_warps: int = TILE_WARPS) -> CompileCase:
    """A CompileCase; integer args default to "i32" and the stride the JIT sees
    as 1 for ``layout`` ("nchw": sHW, "cl": sC) becomes the constexpr 1, as at run time."""
    unit = {"nchw": ("sHW",), "cl": ("sC",), "flat": ()}[layout]
    sig, cx = case_signature(fn, ptr_types, consts, unit)
    return CompileCase(f"{fn.__name__}[{label},{layout}]", fn, sig, cx, num_warps)
