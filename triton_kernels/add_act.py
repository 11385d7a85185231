"""Residual add + activation primitives: add_act_forward, add_act_backward
(see convkernels/ops/primitives.py).

``y = act(residual + scale[n] * x)``: the only per-element parameter is the
per-sample ``scale``, and one sample is a contiguous block of C*H*W elements in
both NCHW and channels_last layouts, so these kernels tile each sample as a flat
1-D range (fully coalesced in either layout).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import ACT_CODES, act_bwd, act_code, act_fwd
from .layout import (
    TRITON_TYPE,
    acc_dtype,
    check_vec,
    conform,
    device_guard,
    empty_out,
    layout_of,
    make_case,
)

# (BLOCK, num_warps), picked by sample size
FLAT_TILES = ((1024, 4), (4096, 8))


def _pick_flat(per_sample: int):
    return FLAT_TILES[1] if per_sample >= FLAT_TILES[1][0] else FLAT_TILES[0]


@triton.jit
def _flat_tile(per_sample, blocks, BLOCK: tl.constexpr):
    """(n, offs, mask) of program_id(0) = n * blocks + block."""
    pid = tl.program_id(0)
    n = pid // blocks
    i = (pid - n * blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # a sample may pass 2**31
    return n, n.to(tl.int64) * per_sample + i, i < per_sample


@triton.jit
def _scaled(v, scale_ptr, n, HAS_SCALE: tl.constexpr):
    """scale[n] * v (v itself without a scale)."""
    if HAS_SCALE:
        return tl.load(scale_ptr + n) * v
    else:
        return v


@triton.jit
def _add_z(x_ptr, res_ptr, scale_ptr, n, offs, mask, acc_ty, HAS_SCALE: tl.constexpr):
    """z = residual + scale[n] * x in acc_ty."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    return r + _scaled(x, scale_ptr, n, HAS_SCALE)


@triton.jit
def _add_act_fwd_kernel(x_ptr, res_ptr, scale_ptr, y_ptr, per_sample, blocks,
                        HAS_SCALE: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(residual + scale[n] * x)."""
    acc_ty = scale_ptr.dtype.element_ty
    n, offs, mask = _flat_tile(per_sample, blocks, BLOCK)
    z = _add_z(x_ptr, res_ptr, scale_ptr, n, offs, mask, acc_ty, HAS_SCALE)
    tl.store(y_ptr + offs, act_fwd(z, ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_act_bwd_kernel(g_ptr, x_ptr, res_ptr, scale_ptr, gx_ptr, gr_ptr, per_sample, blocks,
                        HAS_SCALE: tl.constexpr, ACT: tl.constexpr, NEED_GX: tl.constexpr,
                        NEED_GR: tl.constexpr, BLOCK: tl.constexpr):
    """gz = grad_y * act'(residual + scale[n] * x); grad_x = scale[n] * gz; grad_res = gz."""
    acc_ty = scale_ptr.dtype.element_ty
    n, offs, mask = _flat_tile(per_sample, blocks, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    if ACT == 0:  # identity: z is not needed
        gz = g
    else:
        gz = act_bwd(g, _add_z(x_ptr, res_ptr, scale_ptr, n, offs, mask, acc_ty, HAS_SCALE), ACT)
    if NEED_GX:
        gx = _scaled(gz, scale_ptr, n, HAS_SCALE)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_GR:
        tl.store(gr_ptr + offs, gz.to(gr_ptr.dtype.element_ty), mask=mask)


def _prep(x, residual, scale, grad_y=None):
    x, lay = layout_of(x)
    residual = conform(residual, x, lay, "residual")
    if grad_y is not None:
        grad_y = conform(grad_y, x, lay, "grad_y")
    acc = acc_dtype(x.dtype)
    has_scale = scale is not None
    # without a scale, a dummy pointer of the accumulation dtype carries acc_ty
    scale = check_vec(scale, lay.N, acc, "scale") if has_scale else torch.empty(
        1, dtype=acc, device=x.device)
    per_sample = lay.C * lay.HW
    block, warps = _pick_flat(per_sample)
    blocks = triton.cdiv(per_sample, block)
    return x, lay, residual, grad_y, scale, has_scale, per_sample, block, warps, blocks


def add_act_forward(x, residual, scale, act):
    """y = act(residual + scale[n] * x) (scale None means 1), in x's dtype."""
    code = act_code(act)
    x, lay, residual, _, scale, has_scale, per_sample, block, warps, blocks = _prep(
        x, residual, scale)
    y = empty_out(x, lay)
    if x.numel() == 0:
        return y
    with device_guard(x):
        _add_act_fwd_kernel[(lay.N * blocks,)](
            x, residual, scale, y, per_sample, blocks,
            HAS_SCALE=has_scale, ACT=code, BLOCK=block, num_warps=warps)
    return y


def add_act_backward(grad_y, x, residual, scale, act, need_grad_x, need_grad_residual):
    """(grad_x, grad_residual); None for an output not asked for."""
    code = act_code(act)
    need_gx = bool(need_grad_x)
    need_gr = bool(need_grad_residual)
    x, lay, residual, grad_y, scale, has_scale, per_sample, block, warps, blocks = _prep(
        x, residual, scale, grad_y)
    if not (need_gx or need_gr):
        return None, None
    gx = empty_out(x, lay) if need_gx else None
    gr = empty_out(x, lay) if need_gr else None
    if x.numel() == 0:
        return gx, gr
    with device_guard(x):
        _add_act_bwd_kernel[(lay.N * blocks,)](
            grad_y, x, residual, scale, gx if gx is not None else gr,
            gr if gr is not None else gx, per_sample, blocks,
            HAS_SCALE=has_scale, ACT=code, NEED_GX=need_gx, NEED_GR=need_gr,
            BLOCK=block, num_warps=warps)
    return gx, gr


# ----------------------------------------------------------------------------
# ahead-of-time compile table
# ----------------------------------------------------------------------------


def compile_cases():
    combos = []  # (dtype, act, (BLOCK, warps), has_scale)
    for i, tile in enumerate(FLAT_TILES):
        combos.append((torch.float32, "relu", tile, i % 2 == 0))
    for i, act in enumerate(ACT_CODES):
        combos.append((torch.bfloat16, act, FLAT_TILES[i % 2], i % 2 == 1))
    combos.append((torch.float16, "silu", FLAT_TILES[1], True))
    cases = []
    for dt, act, (block, warps), has_scale in combos:
        t = "*" + TRITON_TYPE[dt]
        label = f"{TRITON_TYPE[dt]},{act},{block},scale={int(has_scale)}"
        c = dict(HAS_SCALE=has_scale, ACT=act_code(act), BLOCK=block)
        cases.append(make_case(
            _add_act_fwd_kernel, label,
            dict(x_ptr=t, res_ptr=t, scale_ptr="*fp32", y_ptr=t), c,
            layout="flat", num_warps=warps))
        for need_gx, need_gr in ((True, True), (True, False), (False, True)):
            cases.append(make_case(
                _add_act_bwd_kernel, label + f",gx={int(need_gx)},gr={int(need_gr)}",
                dict(g_ptr=t, x_ptr=t, res_ptr=t, scale_ptr="*fp32", gx_ptr=t, gr_ptr=t),
                dict(c, NEED_GX=need_gx, NEED_GR=need_gr), layout="flat", num_warps=warps))
            if dt != torch.float32:
                break
    return cases
