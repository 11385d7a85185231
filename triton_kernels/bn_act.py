"""BatchNorm + activation primitives: channel_stats, bn_act_apply,
bn_act_backward_reduce, bn_act_backward_apply (see convkernels/ops/primitives.py).

Elementwise passes tile each sample into ``[BLOCK_C, BLOCK_HW]`` blocks; per-channel
reductions are two-stage (``[splits, C]`` workspace, fixed-order combine), so results
are deterministic for a given shape and device. Arithmetic is in the accumulation
dtype (fp32, or fp64 for fp64 inputs), taken from the per-channel vectors' pointers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import ACT_CODES, act_bwd, act_code, act_fwd
from .layout import (
    TILES,
    TRITON_TYPE,
    acc_dtype,
    check_vec,
    conform,
    device_guard,
    elementwise_grid,
    empty_out,
    layout_of,
    make_case,
    pick_tile,
    reduce_plan,
    tile_2d,
)

FINALIZE_BLOCK = 256

# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


@triton.jit
def _split_tiles(pid_s, tiles_per_split, total_tiles):
    """Tile range [t0, t1) of split pid_s (see layout.reduce_plan)."""
    t0 = pid_s * tiles_per_split
    return t0, tl.minimum(t0 + tiles_per_split, total_tiles)


@triton.jit
def _bn_z(x, scale, shift, res_ptr, offs, mask, HAS_RES: tl.constexpr):
    """Pre-activation z = x * scale + shift (+ residual) in x's (acc) dtype; scale
    and shift are [BLOCK_C, 1]."""
    z = x * scale + shift
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(x.dtype)
    return z


@triton.jit
def _merge_mean(mean, t_mean, w):
    """Chan's ``mean + (t_mean - mean) * w``, but ``mean + t_mean`` where either
    is inf or NaN: then the mean is that of a sum, as torch's batch mean (inf
    for a channel holding inf, where Chan's would give inf - inf = NaN)."""
    finite = (tl.abs(mean) < float("inf")) & (tl.abs(t_mean) < float("inf"))
    return tl.where(finite, mean + (t_mean - mean) * w, mean + t_mean)


@triton.jit
def _channel_stats_partial_kernel(
    x_ptr, part_ptr, C, HW, sN, sC, sHW, hw_blocks, total_tiles, tiles_per_split,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per (channel block, split): mean, M2 and count over a range of tiles.

    Values are shifted by one sample of their channel (x[0, c, 0], the same in
    every split), so tile means are small and exact to a few ulps of the spread,
    not of the magnitude. Each tile's mean and centred M2 are computed in two
    passes over the registers, then merged with Chan's formula (no
    sum-of-squares cancellation). part is [4, splits, C]: shifted mean, m2,
    count, shift.
    """
    acc_ty = part_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    mean = tl.zeros([BLOCK_C], acc_ty)
    m2 = tl.zeros([BLOCK_C], acc_ty)
    cnt = tl.zeros([BLOCK_C], acc_ty)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # the first value of each channel (a shift for the variance); c * sC may pass 2**31
    shift = tl.load(x_ptr + c.to(tl.int64) * sC, mask=c_mask, other=0.0).to(acc_ty)
    t0, t1 = _split_tiles(pid_s, tiles_per_split, total_tiles)
    for t in range(t0, t1):
        _, _, _, offs, mask, n_valid = tile_2d(t, pid_c, hw_blocks, C, HW, sN, sC, sHW,
                                               BLOCK_C, BLOCK_HW)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        x = tl.where(mask, x - shift[:, None], 0.0)
        nt = n_valid.to(acc_ty)
        t_mean = tl.sum(x, axis=1) / nt
        d = tl.where(mask, x - t_mean[:, None], 0.0)
        t_m2 = tl.sum(d * d, axis=1)
        new_cnt = cnt + nt
        w = nt / new_cnt
        delta = t_mean - mean
        mean = _merge_mean(mean, t_mean, w)
        m2 += t_m2 + delta * delta * (cnt * w)
        cnt = new_cnt
    out = part_ptr + pid_s * C + c
    tl.store(out, mean, mask=c_mask)
    tl.store(out + splits * C, m2, mask=c_mask)
    tl.store(out + 2 * splits * C, cnt, mask=c_mask)
    tl.store(out + 3 * splits * C, shift, mask=c_mask)


@triton.jit
def _channel_stats_finalize_kernel(part_ptr, mean_ptr, var_ptr, C, splits,
                                   BLOCK: tl.constexpr):
    """Merge the [4, splits, C] partials in split order: mean, biased variance."""
    acc_ty = part_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c_mask = c < C
    mean = tl.zeros([BLOCK], acc_ty)
    m2 = tl.zeros([BLOCK], acc_ty)
    cnt = tl.zeros([BLOCK], acc_ty)
    for s in range(0, splits):
        p = part_ptr + s * C + c
        p_mean = tl.load(p, mask=c_mask, other=0.0)
        p_m2 = tl.load(p + splits * C, mask=c_mask, other=0.0)
        p_cnt = tl.load(p + 2 * splits * C, mask=c_mask, other=0.0)
        new_cnt = cnt + p_cnt
        w = tl.where(new_cnt > 0, p_cnt / tl.where(new_cnt > 0, new_cnt, 1.0), 0.0)
        delta = p_mean - mean
        mean = _merge_mean(mean, p_mean, w)
        m2 += p_m2 + delta * delta * (cnt * w)
        cnt = new_cnt
    shift = tl.load(part_ptr + 3 * splits * C + c, mask=c_mask, other=0.0)
    tl.store(mean_ptr + c, shift + mean, mask=c_mask)
    tl.store(var_ptr + c, m2 / tl.where(c_mask, cnt, 1.0), mask=c_mask)


@triton.jit
def _bn_act_apply_kernel(
    x_ptr, res_ptr, y_ptr, scale_ptr, shift_ptr, C, HW, sN, sC, sHW, hw_blocks,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """y = act(x * scale[c] + shift[c] (+ residual))."""
    _, c, c_mask, offs, mask, _ = tile_2d(tl.program_id(0), tl.program_id(1), hw_blocks,
                                          C, HW, sN, sC, sHW, BLOCK_C, BLOCK_HW)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    acc_ty = scale.dtype
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    y = act_fwd(_bn_z(x, scale[:, None], shift[:, None], res_ptr, offs, mask, HAS_RES), ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_backward_reduce_kernel(
    g_ptr, x_ptr, res_ptr, scale_ptr, shift_ptr, center_ptr, part_ptr,
    C, HW, sN, sC, sHW, hw_blocks, total_tiles, tiles_per_split,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per (channel block, split): sum(gz), sum(gz * (x - center)) into part [2, splits, C]."""
    acc_ty = part_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)[:, None]
    center = tl.load(center_ptr + c, mask=c_mask, other=0.0)[:, None]
    acc_gz = tl.zeros([BLOCK_C, BLOCK_HW], acc_ty)
    acc_gzx = tl.zeros([BLOCK_C, BLOCK_HW], acc_ty)
    t0, t1 = _split_tiles(pid_s, tiles_per_split, total_tiles)
    for t in range(t0, t1):
        _, _, _, offs, mask, _ = tile_2d(t, pid_c, hw_blocks, C, HW, sN, sC, sHW,
                                         BLOCK_C, BLOCK_HW)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        z = _bn_z(x, scale, shift, res_ptr, offs, mask, HAS_RES)
        gz = tl.where(mask, act_bwd(g, z, ACT), 0.0)
        acc_gz += gz
        acc_gzx += gz * (x - center)
    out = part_ptr + pid_s * C + c
    tl.store(out, tl.sum(acc_gz, axis=1), mask=c_mask)
    tl.store(out + splits * C, tl.sum(acc_gzx, axis=1), mask=c_mask)


@triton.jit
def _bn_act_backward_apply_kernel(
    g_ptr, x_ptr, res_ptr, scale_ptr, shift_ptr, k1_ptr, k2_ptr, k3_ptr, gx_ptr, gr_ptr,
    C, HW, sN, sC, sHW, hw_blocks,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, NEED_GX: tl.constexpr, NEED_GR: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """gz = grad_y * act'(z); grad_x = k1[c] * gz + k2[c] * x + k3[c]; grad_residual = gz."""
    _, c, c_mask, offs, mask, _ = tile_2d(tl.program_id(0), tl.program_id(1), hw_blocks,
                                          C, HW, sN, sC, sHW, BLOCK_C, BLOCK_HW)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)[:, None]
    acc_ty = scale.dtype
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    gz = act_bwd(g, _bn_z(x, scale, shift, res_ptr, offs, mask, HAS_RES), ACT)
    if NEED_GX:
        k1 = tl.load(k1_ptr + c, mask=c_mask, other=0.0)[:, None]
        k2 = tl.load(k2_ptr + c, mask=c_mask, other=0.0)[:, None]
        k3 = tl.load(k3_ptr + c, mask=c_mask, other=0.0)[:, None]
        gx = k1 * gz + tl.where(k2 == 0, 0.0, k2 * x) + k3  # eval (k2 = 0): no 0 * inf
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_GR:
        tl.store(gr_ptr + offs, gz.to(gr_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# launchers (the contract's primitives)
# ----------------------------------------------------------------------------


def _prep(x, residual, *, grad_y=None):
    x, lay = layout_of(x)
    if grad_y is not None:
        grad_y = conform(grad_y, x, lay, "grad_y")
    if residual is not None:
        residual = conform(residual, x, lay, "residual")
    return x, lay, residual, grad_y


def channel_stats(x):
    """Per-channel mean and biased variance over N, H, W."""
    x, lay = layout_of(x)
    acc = acc_dtype(x.dtype)
    C = lay.C
    mean = torch.empty(C, dtype=acc, device=x.device)
    var = torch.empty(C, dtype=acc, device=x.device)
    if C == 0:
        return mean, var
    if lay.N * lay.HW == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    plan = reduce_plan(lay, x.device)
    part = torch.empty((4, plan.splits, C), dtype=acc, device=x.device)
    with device_guard(x):
        _channel_stats_partial_kernel[plan.grid](
            x, part, C, lay.HW, *lay.strides, plan.hw_blocks, plan.total_tiles,
            plan.tiles_per_split, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
            num_warps=plan.num_warps)
        _channel_stats_finalize_kernel[(triton.cdiv(C, FINALIZE_BLOCK),)](
            part, mean, var, C, plan.splits, BLOCK=FINALIZE_BLOCK, num_warps=4)
    return mean, var


def bn_act_apply(x, scale, shift, residual, act):
    """y = act(x * scale[c] + shift[c] (+ residual)), in x's dtype."""
    code = act_code(act)
    x, lay, residual, _ = _prep(x, residual)
    acc = acc_dtype(x.dtype)
    scale = check_vec(scale, lay.C, acc, "scale")
    shift = check_vec(shift, lay.C, acc, "shift")
    y = empty_out(x, lay)
    if x.numel() == 0:
        return y
    block_c, block_hw, warps = pick_tile(lay)
    grid, hw_blocks = elementwise_grid(lay, block_c, block_hw)
    with device_guard(x):
        _bn_act_apply_kernel[grid](
            x, residual if residual is not None else x, y, scale, shift,
            lay.C, lay.HW, *lay.strides, hw_blocks,
            HAS_RES=residual is not None, ACT=code, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=warps)
    return y


def bn_act_backward_reduce(grad_y, x, scale, shift, residual, act, center):
    """(sum(gz), sum(gz * (x - center[c]))) per channel, gz = grad_y * act'(z)."""
    code = act_code(act)
    x, lay, residual, grad_y = _prep(x, residual, grad_y=grad_y)
    acc = acc_dtype(x.dtype)
    C = lay.C
    scale = check_vec(scale, C, acc, "scale")
    shift = check_vec(shift, C, acc, "shift")
    center = check_vec(center, C, acc, "center")
    if C == 0 or x.numel() == 0:
        z = torch.zeros((2, C), dtype=acc, device=x.device)
        return z[0], z[1]
    plan = reduce_plan(lay, x.device)
    part = torch.empty((2, plan.splits, C), dtype=acc, device=x.device)
    with device_guard(x):
        _bn_act_backward_reduce_kernel[plan.grid](
            grad_y, x, residual if residual is not None else x, scale, shift, center, part,
            C, lay.HW, *lay.strides, plan.hw_blocks, plan.total_tiles, plan.tiles_per_split,
            HAS_RES=residual is not None, ACT=code, BLOCK_C=plan.block_c,
            BLOCK_HW=plan.block_hw, num_warps=plan.num_warps)
    sums = part[:, 0] if plan.splits == 1 else part.sum(dim=1)
    return sums[0], sums[1]


def bn_act_backward_apply(grad_y, x, scale, shift, residual, act, k1, k2, k3,
                          need_grad_x, need_grad_residual):
    """(grad_x, grad_residual) in one pass; None for an output not asked for."""
    code = act_code(act)
    x, lay, residual, grad_y = _prep(x, residual, grad_y=grad_y)
    need_gx = bool(need_grad_x)
    need_gr = bool(need_grad_residual)
    if not (need_gx or need_gr):
        return None, None
    acc = acc_dtype(x.dtype)
    C = lay.C
    scale = check_vec(scale, C, acc, "scale")
    shift = check_vec(shift, C, acc, "shift")
    if need_gx:
        k1 = check_vec(k1, C, acc, "k1")
        k2 = check_vec(k2, C, acc, "k2")
        k3 = check_vec(k3, C, acc, "k3")
    else:
        k1 = k2 = k3 = scale
    gx = empty_out(x, lay) if need_gx else None
    gr = empty_out(x, lay) if need_gr else None
    if x.numel() == 0:
        return gx, gr
    block_c, block_hw, warps = pick_tile(lay)
    grid, hw_blocks = elementwise_grid(lay, block_c, block_hw)
    with device_guard(x):
        _bn_act_backward_apply_kernel[grid](
            grad_y, x, residual if residual is not None else x, scale, shift, k1, k2, k3,
            gx if gx is not None else gr, gr if gr is not None else gx,
            C, lay.HW, *lay.strides, hw_blocks,
            HAS_RES=residual is not None, ACT=code, NEED_GX=need_gx, NEED_GR=need_gr,
            BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps)
    return gx, gr


# ----------------------------------------------------------------------------
# ahead-of-time compile table
# ----------------------------------------------------------------------------


def _variants():
    """(dtype, act, tile, layout, has_res) combos: every tile once, every act and
    every dtype at least once; layouts and residual alternate."""
    default_tile = TILES[3]
    out = []
    for i, tile in enumerate(TILES):
        out.append((torch.float32, "relu", tile, ("nchw", "cl")[i % 2], i % 2 == 0))
    for i, act in enumerate(ACT_CODES):
        out.append((torch.bfloat16, act, default_tile, ("cl", "nchw")[i % 2], i % 2 == 1))
    out.append((torch.float16, "silu", TILES[0], "nchw", True))
    out.append((torch.float16, "sigmoid", TILES[-1], "cl", False))
    return out


def compile_cases():
    cases = []
    for dt, act, (bc, bhw), layout, has_res in _variants():
        t = "*" + TRITON_TYPE[dt]
        label = f"{TRITON_TYPE[dt]},{act},{bc}x{bhw},res={int(has_res)}"
        ew = dict(ACT=act_code(act), HAS_RES=has_res, BLOCK_C=bc, BLOCK_HW=bhw)
        acc = "*fp32"
        cases.append(make_case(
            _bn_act_apply_kernel, label,
            dict(x_ptr=t, res_ptr=t, y_ptr=t, scale_ptr=acc, shift_ptr=acc), ew, layout=layout))
        cases.append(make_case(
            _bn_act_backward_reduce_kernel, label,
            dict(g_ptr=t, x_ptr=t, res_ptr=t, scale_ptr=acc, shift_ptr=acc, center_ptr=acc,
                 part_ptr=acc), ew, layout=layout))
        # grad flags cycle through (gx, gr), (gx only), (gr only)
        need_gx, need_gr = ((True, True), (True, False), (False, True))[len(cases) % 3]
        cases.append(make_case(
            _bn_act_backward_apply_kernel, label + f",gx={int(need_gx)},gr={int(need_gr)}",
            dict(g_ptr=t, x_ptr=t, res_ptr=t, scale_ptr=acc, shift_ptr=acc, k1_ptr=acc,
                 k2_ptr=acc, k3_ptr=acc, gx_ptr=t, gr_ptr=t),
            dict(ew, NEED_GX=need_gx, NEED_GR=need_gr), layout=layout))
        if act == "relu" and dt != torch.float32:
            continue
        cases.append(make_case(
            _channel_stats_partial_kernel, f"{TRITON_TYPE[dt]},{bc}x{bhw}",
            dict(x_ptr=t, part_ptr=acc), dict(BLOCK_C=bc, BLOCK_HW=bhw), layout=layout))
    cases.append(make_case(
        _channel_stats_finalize_kernel, f"fp32,{FINALIZE_BLOCK}",
        dict(part_ptr="*fp32", mean_ptr="*fp32", var_ptr="*fp32"),
        dict(BLOCK=FINALIZE_BLOCK), layout="flat"))
    # dedupe by name (stats cases repeat across acts)
    seen, uniq = set(), []
    for c in cases:
        if c.name not in seen:
            seen.add(c.name)
            uniq.append(c)
    return uniq
