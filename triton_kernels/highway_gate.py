"""Highway gate primitives: highway_gate_forward, highway_gate_backward
(see convkernels/ops/primitives.py).

``t = sigmoid(gate)``, ``y = h * t + x * (1 - t)``. No parameter at all, so the
three tensors (dense in one memory format) are one flat 1-D range, tiled as
add_act's samples are (its FLAT_TILES), fully coalesced in either layout.
The arithmetic keeps the eager formula's form (see csrc/cpu/highway_gate_cpu.cpp)
and the launches turn off Triton's mul+add -> FMA fusion for the same reason.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import SIGMOID, act_fwd
from .add_act import FLAT_TILES, _pick_flat
from .layout import TRITON_TYPE, conform, device_guard, empty_out, layout_of, make_case

_SIGMOID = tl.constexpr(SIGMOID)  # a global a jitted function may read


@triton.jit
def _load(ptr, offs, mask, FP64: tl.constexpr):
    """ptr[offs] in the accumulation dtype (float64 for float64 tensors, else float32)."""
    v = tl.load(ptr + offs, mask=mask, other=0.0)
    if FP64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _flat(numel, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # numel may pass 2**31
    return i, i < numel


@triton.jit
def _highway_gate_fwd_kernel(h_ptr, gate_ptr, x_ptr, y_ptr, numel, FP64: tl.constexpr,
                             BLOCK: tl.constexpr):
    """y = h * t + x * (1 - t), t = sigmoid(gate)."""
    offs, mask = _flat(numel, BLOCK)
    t = act_fwd(_load(gate_ptr, offs, mask, FP64), _SIGMOID)
    y = _load(h_ptr, offs, mask, FP64) * t + _load(x_ptr, offs, mask, FP64) * (1.0 - t)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _highway_gate_bwd_kernel(g_ptr, h_ptr, gate_ptr, x_ptr, gh_ptr, gg_ptr, gx_ptr, numel,
                             FP64: tl.constexpr, NEED_GH: tl.constexpr, NEED_GG: tl.constexpr,
                             NEED_GX: tl.constexpr, BLOCK: tl.constexpr):
    """grad_h = g t, grad_x = g (1 - t), grad_gate = (g h - g x) (1 - t) t, t recomputed."""
    offs, mask = _flat(numel, BLOCK)
    g = _load(g_ptr, offs, mask, FP64)
    t = act_fwd(_load(gate_ptr, offs, mask, FP64), _SIGMOID)
    c = 1.0 - t
    if NEED_GH:
        tl.store(gh_ptr + offs, (g * t).to(gh_ptr.dtype.element_ty), mask=mask)
    if NEED_GX:
        tl.store(gx_ptr + offs, (g * c).to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_GG:
        gt = g * _load(h_ptr, offs, mask, FP64) - g * _load(x_ptr, offs, mask, FP64)
        tl.store(gg_ptr + offs, (gt * c * t).to(gg_ptr.dtype.element_ty), mask=mask)


def _prep(h, others: dict):
    h, lay = layout_of(h)
    others = {name: conform(t, h, lay, name) for name, t in others.items()}
    block, warps = _pick_flat(h.numel())
    return h, lay, others, block, warps, (triton.cdiv(h.numel(), block),)


def _launch(kernel, grid, h, *args, warps, **consts):
    with device_guard(h):
        # (the interpreter takes no compile options)
        opts = {} if h.device.type == "cpu" else {"enable_fp_fusion": False}
        kernel[grid](*args, h.numel(), FP64=h.dtype == torch.float64, num_warps=warps,
                     **consts, **opts)


def highway_gate_forward(h, gate, x):
    """y = h * sigmoid(gate) + x * (1 - sigmoid(gate)), in h's dtype."""
    h, lay, t, block, warps, grid = _prep(h, {"gate": gate, "x": x})
    y = empty_out(h, lay)
    if h.numel():
        _launch(_highway_gate_fwd_kernel, grid, h, h, t["gate"], t["x"], y, warps=warps,
                BLOCK=block)
    return y


def highway_gate_backward(grad_y, h, gate, x, need_grad_h, need_grad_gate, need_grad_x):
    """(grad_h, grad_gate, grad_x); None for an output not asked for."""
    h, lay, t, block, warps, grid = _prep(h, {"grad_y": grad_y, "gate": gate, "x": x})
    need = (bool(need_grad_h), bool(need_grad_gate), bool(need_grad_x))
    outs = [empty_out(h, lay) if n else None for n in need]
    if h.numel() and any(need):
        spare = next(o for o in outs if o is not None)  # a pointer for the outputs not written
        _launch(_highway_gate_bwd_kernel, grid, h, t["grad_y"], h, t["gate"], t["x"],
                *(spare if o is None else o for o in outs), warps=warps,
                NEED_GH=need[0], NEED_GG=need[1], NEED_GX=need[2], BLOCK=block)
    return tuple(outs)


# ----------------------------------------------------------------------------
# ahead-of-time compile table
# ----------------------------------------------------------------------------


def compile_cases():
    cases = []
    for i, dt in enumerate((torch.float32, torch.bfloat16, torch.float16)):
        t = "*" + TRITON_TYPE[dt]
        block, warps = FLAT_TILES[i % 2]
        label = f"{TRITON_TYPE[dt]},{block}"
        c = dict(FP64=False, BLOCK=block)
        cases.append(make_case(_highway_gate_fwd_kernel, label,
                               dict(h_ptr=t, gate_ptr=t, x_ptr=t, y_ptr=t), c,
                               layout="flat", num_warps=warps))
        for need in ((True, True, True), (False, True, False), (True, False, True)):
            cases.append(make_case(
                _highway_gate_bwd_kernel, label + ",need=" + "".join(str(int(n)) for n in need),
                dict(g_ptr=t, h_ptr=t, gate_ptr=t, x_ptr=t, gh_ptr=t, gg_ptr=t, gx_ptr=t),
                dict(c, NEED_GH=need[0], NEED_GG=need[1], NEED_GX=need[2]),
                layout="flat", num_warps=warps))
    return cases
