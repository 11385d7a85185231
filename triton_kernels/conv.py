"""Fused 2-D convolution: ``conv2d_fused`` (prologue + conv + epilogue + batch stats).

    y = act(conv2d(in_act(x * in_scale[c] + in_shift[c]), weight) + bias (+ residual))

Three kernels, picked per shape by the launcher (``_plan``):

* ``_conv_gemm_kernel`` -- implicit GEMM on tensor cores (``tl.dot``) for
  ``Cout/groups >= 16``: M = N*OH*OW, N_gemm = Cout/groups, K = KH*KW*Cin/groups,
  grid ``(m tiles * n tiles, groups)`` (n-tiles of one m-tile adjacent, so the
  input tile is re-read from L2). Two K loops (constexpr ``TAP_MAJOR``):
  ``Cin/groups >= 16``: a flat loop over (kh, kw) x Cin-blocks, the row gather
  computed once per tap; else (stems, Cin = 3) an im2col loop over the flat K
  index, each element's (kh, kw, ci) decoded in the tile.
* ``_conv_direct_kernel`` -- CUDA-core FMA kernel for ``Cout/groups < 16`` and
  depthwise (``Cin/groups == 1``): a ``[BLOCK_M, BLOCK_C]`` tile of output
  positions x output channels (channels vectorised; contiguous in
  channels_last), loop over taps x the group's input channels. With
  ``groups == 1`` (constexpr ``ONE_GROUP``) one input column is loaded per
  (tap, ci) and multiplied as an outer product with the weight row; otherwise
  every channel gathers its own group's input (ResNeXt groups, depthwise with
  any channel multiplier).

Both share the epilogue (``_epilogue``): bias, per-tile batch statistics of
``acc + bias`` (count, mean, centred M2 per channel, two passes over the
register tile) into a ``[3, tiles, Cout]`` workspace merged in float64 by the
launcher with Chan's formula (deterministic, no atomics), residual, activation,
store in x's dtype through arbitrary output strides (``out`` may be a channel
slice of a larger buffer).

The prologue transforms each loaded input element of an in-bounds tap; taps in
the zero padding stay exactly 0 after the transform.

Both kernels are ``@triton.autotune``-d over small config lists (keyed on the
per-group channels, kernel size, stride and an M bucket); results never depend
on the config: with stats only configs with BLOCK_M >= STATS_MIN_BLOCK_M run, the
workspace is sized for that, carries its own per-tile counts, is zeroed by the
autotuner after benchmarking, and only the rows of the config that ran are merged.
``out`` must not overlap ``x`` or ``residual`` (checked; disjoint channel slices of
one buffer are fine). ``compile_cases()`` lists every config for the ahead-of-time
compile test. Under ``TRITON_INTERPRET=1`` the autotuner is bypassed
(``CONV_INTERPRET_CONFIG`` picks the config; tests sweep them all).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .activations import ACT_CODES, act_code, act_fwd
from .layout import TRITON_TYPE, CompileCase, case_signature, device_guard

# ----------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Shared memory per stage is
# (BM + BN) * BK * elem bytes; fp32 operands double it, the largest fp32 case
# (128x128x32, 4 stages) is 128 KiB < sm_80's 163 KiB.
GEMM_CONFIGS = (
    (128, 128, 32, 8, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 3),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 4, 4),
    (64, 16, 16, 4, 4),
    (32, 64, 32, 4, 4),
    (16, 64, 16, 2, 3),
)
# fp32 with BLOCK_K 64: (128 + 128) * 64 * 4 B * 3 stages = 192 KiB, over sm_80's
# limit; these configs run only with 2-byte operands (see _prune_gemm).
_GEMM_HALF_ONLY = {(128, 128, 64, 8, 3)}

# (BLOCK_M, BLOCK_C, num_warps, num_stages)
DIRECT_CONFIGS = (
    (128, 16, 4, 2),
    (64, 32, 4, 2),
    (32, 64, 4, 2),
    (16, 128, 4, 2),
    (256, 8, 4, 2),
    (128, 4, 4, 2),
)

MIN_BLOCK_M = min(min(c[0] for c in GEMM_CONFIGS), min(c[0] for c in DIRECT_CONFIGS))
# With stats, only configs with BLOCK_M >= this run (the pruners enforce it), so the
# [3, cdiv(M, STATS_MIN_BLOCK_M), Cout] workspace stays ~5% of the output.
STATS_MIN_BLOCK_M = 64

# Config index used under the interpreter (no autotuning there); None -> default.
CONV_INTERPRET_CONFIG = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(int(m), 1)), 1 << 22)


def _prune_gemm(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    cin_g, cout_g, m = args["Cin_g"], args["Cout_g"], args["M_BUCKET"]
    half = args["x_ptr"].element_size() <= 2 if hasattr(args["x_ptr"], "element_size") else True
    tap_major = args["TAP_MAJOR"]
    kdim = cin_g if tap_major else cin_g * args["KH"] * args["KW"]
    bn_cap = max(16, triton.next_power_of_2(cout_g))
    bk_cap = max(16, triton.next_power_of_2(kdim))
    bm_min = STATS_MIN_BLOCK_M if args["STATS"] else 0
    bm_cap = max(16, bm_min, triton.next_power_of_2(m))
    ok = [c for c in configs if c.kwargs["BLOCK_M"] >= bm_min and (
        half or (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                 c.num_stages) not in _GEMM_HALF_ONLY)]
    keep = [c for c in ok if c.kwargs["BLOCK_N"] <= bn_cap and c.kwargs["BLOCK_K"] <= bk_cap
            and c.kwargs["BLOCK_M"] <= bm_cap]
    if not keep:  # the smallest tile
        keep = [min(ok, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
                    * c.kwargs["BLOCK_K"])]
    return keep


def _prune_direct(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    c_cap = max(4, triton.next_power_of_2(args["Cout"]))
    bm_min = STATS_MIN_BLOCK_M if args["STATS"] else 0
    m_cap = max(16, bm_min, triton.next_power_of_2(args["M_BUCKET"]))
    ok = [c for c in configs if c.kwargs["BLOCK_M"] >= bm_min]
    keep = [c for c in ok if c.kwargs["BLOCK_C"] <= c_cap and c.kwargs["BLOCK_M"] <= m_cap]
    if not keep:
        keep = [min(ok, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_C"])]
    return keep


def _gemm_triton_configs():
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in GEMM_CONFIGS]


def _direct_triton_configs():
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_C=bc), num_warps=w, num_stages=s)
            for bm, bc, w, s in DIRECT_CONFIGS]


# Every argument that changes the best config or which configs may run: STATS
# (stats calls run only configs with BLOCK_M >= STATS_MIN_BLOCK_M, which the
# workspace is sized for; an eval call's cached choice must never serve them),
# Cout with Cout_g (groups: depthwise layers of different widths), LAYOUT (which
# of x, weight and out have unit channel stride), and, added by the autotuner,
# every tensor argument's dtype.
_TUNE_KEY = ["Cin_g", "Cout_g", "Cout", "KH", "KW", "stride_h", "stride_w", "M_BUCKET", "LAYOUT",
             "STATS"]


def _autotune(configs, prune):
    """@triton.autotune shared by the conv kernels (the stats workspace is zeroed
    after benchmarking)."""
    return triton.autotune(configs=configs, key=_TUNE_KEY, reset_to_zero=["ws_ptr"],
                           prune_configs_by={"early_config_prune": prune})

# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


@triton.jit
def _wide(sxc, sxh, sxw, swo, swc, swh, sww, src, srh, srw, soc, soh, sow, IDX64: tl.constexpr):
    """The within-sample strides, as int64 when IDX64 (the launcher's check that
    some offset within a sample of x, weight, residual or out may reach 2**31):
    every offset multiplied by them is then computed in int64. Else as they are
    (int32, or the constant 1 the JIT made of a unit stride)."""
    if IDX64:
        one = tl.full((), 1, tl.int64)
        return (sxc * one, sxh * one, sxw * one, swo * one, swc * one, swh * one, sww * one,
                src * one, srh * one, srw * one, soc * one, soh * one, sow * one)
    else:
        return sxc, sxh, sxw, swo, swc, swh, sww, src, srh, srw, soc, soh, sow


@triton.jit
def _out_pos(offs_m, OH, OW):
    """(n, oh, ow) of flat output positions offs_m = n*OH*OW + oh*OW + ow."""
    ohw = OH * OW
    n_idx = offs_m // ohw
    r = offs_m - n_idx * ohw
    oh = r // OW
    ow = r - oh * OW
    return n_idx, oh, ow


@triton.jit
def _m_tile(pid_m, M, OH, OW, stride_h, stride_w, pad_h, pad_w, BLOCK_M: tl.constexpr):
    """Output positions of M-tile pid_m: (offs_m, m_mask, n, ih0, iw0), where
    (ih0, iw0) is the input position under tap (0, 0)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n_idx, oh, ow = _out_pos(offs_m, OH, OW)
    return offs_m, m_mask, n_idx, oh * stride_h - pad_h, ow * stride_w - pad_w


@triton.jit
def _prologue(v, v_mask, scale_ptr, shift_ptr, ch, ch_mask, acc_ty, IN_ACT: tl.constexpr):
    """in_act(v * in_scale[ch] + in_shift[ch]) in acc_ty on a [rows, channels] tile;
    0 where v_mask is off (the zero padding stays exactly 0)."""
    s = tl.load(scale_ptr + ch, mask=ch_mask, other=0.0).to(acc_ty)
    t = tl.load(shift_ptr + ch, mask=ch_mask, other=0.0).to(acc_ty)
    return tl.where(v_mask, act_fwd(v.to(acc_ty) * s[None, :] + t[None, :], IN_ACT), 0.0)


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc + a @ b on tensor cores (tf32 or full-precision fp32 inputs)."""
    if ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _epilogue(acc, pid_m, offs_m, m_mask, co, n_mask, M, OH, OW, Cout,
              bias_ptr, res_ptr, out_ptr, ws_ptr, WS_T,
              srn, src, srh, srw, son, soc, soh, sow,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
              STATS: tl.constexpr, BLOCK_M: tl.constexpr):
    """bias, tile stats, residual, act, store. acc: [BLOCK_M, BLOCK_N] in acc dtype;
    offs_m: output positions (n*OH*OW + oh*OW + ow); co: absolute output channels."""
    acc_ty = acc.dtype
    if HAS_BIAS:
        b = tl.load(bias_ptr + co, mask=n_mask, other=0.0).to(acc_ty)
        acc = acc + b[None, :]
    valid = m_mask[:, None] & n_mask[None, :]
    if STATS:
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(acc_ty)
        z = tl.where(valid, acc, 0.0)
        t_mean = tl.sum(z, axis=0) / cnt
        d = tl.where(valid, acc - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        wsp = ws_ptr + pid_m * Cout + co
        tl.store(wsp, t_mean.to(ws_ptr.dtype.element_ty), mask=n_mask)
        tl.store(wsp + WS_T * Cout, t_m2.to(ws_ptr.dtype.element_ty), mask=n_mask)
        tl.store(wsp + 2 * WS_T * Cout, (tl.zeros_like(t_mean) + cnt).to(ws_ptr.dtype.element_ty),
                 mask=n_mask)
    n_idx, oh, ow = _out_pos(offs_m, OH, OW)
    n64 = n_idx.to(tl.int64)
    if HAS_RES:
        r_off = (n64 * srn + oh * srh + ow * srw)[:, None] + (co * src)[None, :]
        acc = acc + tl.load(res_ptr + r_off, mask=valid, other=0.0).to(acc_ty)
    y = act_fwd(acc, ACT)
    o_off = (n64 * son + oh * soh + ow * sow)[:, None] + (co * soc)[None, :]
    tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=valid)


@_autotune(_gemm_triton_configs(), _prune_gemm)
@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, ws_ptr,
    H, W, OH, OW, M, Cin_g, Cout_g, Cout, WS_T,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    srn, src, srh, srw,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, M_BUCKET, LAYOUT,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, ALLOW_TF32: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRO: tl.constexpr, IN_ACT: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Implicit-GEMM conv tile [BLOCK_M positions, BLOCK_N channels of group g]."""
    sxc, sxh, sxw, swo, swc, swh, sww, src, srh, srw, soc, soh, sow = _wide(
        sxc, sxh, sxw, swo, swc, swh, sww, src, srh, srw, soc, soh, sow, IDX64)
    acc_ty = ws_ptr.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    op_ty = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    g = tl.program_id(1)
    n_tiles = tl.cdiv(Cout_g, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid - pid_m * n_tiles

    offs_m, m_mask, n_idx, ih0, iw0 = _m_tile(pid_m, M, OH, OW, stride_h, stride_w, pad_h, pad_w,
                                              BLOCK_M)
    x_row = x_ptr + n_idx.to(tl.int64) * sxn + (g * Cin_g) * sxc  # [BLOCK_M] pointers

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cout_g
    co = g * Cout_g + offs_n
    w_col = w_ptr + co * swo  # [BLOCK_N] pointers
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
    if TAP_MAJOR:
        kblocks = tl.cdiv(Cin_g, BLOCK_K)
        total = KH * KW * kblocks
        for it in range(0, total):
            tap = it // kblocks
            cb = it - tap * kblocks
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ci = cb * BLOCK_K + offs_k
            k_ok = ci < Cin_g
            a_mask = row_ok[:, None] & k_ok[None, :]
            a = tl.load((x_row + (ih * sxh + iw * sxw))[:, None] + (ci * sxc)[None, :],
                        mask=a_mask, other=0.0)
            if HAS_PRO:
                a = _prologue(a, a_mask, scale_ptr + g * Cin_g, shift_ptr + g * Cin_g, ci, k_ok,
                              acc_ty, IN_ACT).to(op_ty)
            b = tl.load((w_col + kh * swh + kw * sww)[None, :] + (ci * swc)[:, None],
                        mask=k_ok[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
    else:
        k_total = KH * KW * Cin_g
        for k0 in range(0, k_total, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_total
            tap = kk // Cin_g
            ci = kk - tap * Cin_g
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            a_mask = (m_mask[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H)
                      & (iw >= 0) & (iw < W))
            a = tl.load(x_row[:, None] + (ih * sxh + iw * sxw + (ci * sxc)[None, :]),
                        mask=a_mask, other=0.0)
            if HAS_PRO:
                a = _prologue(a, a_mask, scale_ptr + g * Cin_g, shift_ptr + g * Cin_g, ci, k_ok,
                              acc_ty, IN_ACT).to(op_ty)
            b = tl.load(w_col[None, :] + (kh * swh + kw * sww + ci * swc)[:, None],
                        mask=k_ok[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)

    _epilogue(acc, pid_m, offs_m, m_mask, co, n_mask, M, OH, OW, Cout,
              bias_ptr, res_ptr, out_ptr, ws_ptr, WS_T,
              srn, src, srh, srw, son, soc, soh, sow,
              HAS_BIAS, HAS_RES, ACT, STATS, BLOCK_M)


@_autotune(_direct_triton_configs(), _prune_direct)
@triton.jit
def _conv_direct_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, ws_ptr,
    H, W, OH, OW, M, Cin_g, Cout_g, Cout, WS_T,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    srn, src, srh, srw,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, M_BUCKET, LAYOUT,
    KH: tl.constexpr, KW: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRO: tl.constexpr, IN_ACT: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Direct conv tile [BLOCK_M positions, BLOCK_C output channels], FMA in acc dtype."""
    sxc, sxh, sxw, swo, swc, swh, sww, src, srh, srw, soc, soh, sow = _wide(
        sxc, sxh, sxw, swo, swc, swh, sww, src, srh, srw, soc, soh, sow, IDX64)
    acc_ty = ws_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)

    offs_m, m_mask, n_idx, ih0, iw0 = _m_tile(pid_m, M, OH, OW, stride_h, stride_w, pad_h, pad_w,
                                              BLOCK_M)
    x_row = x_ptr + n_idx.to(tl.int64) * sxn  # [BLOCK_M] pointers

    co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = co < Cout
    cin0 = (co // Cout_g) * Cin_g  # first input channel of each output channel's group
    w_col = w_ptr + co * swo

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    for kh in range(0, KH):
        ih = ih0 + kh * dil_h
        h_ok = m_mask & (ih >= 0) & (ih < H)
        for kw in range(0, KW):
            iw = iw0 + kw * dil_w
            row_ok = h_ok & (iw >= 0) & (iw < W)
            x_sp = x_row + (ih * sxh + iw * sxw)
            w_tap = w_col + kh * swh + kw * sww
            for ci in range(0, Cin_g):
                wv = tl.load(w_tap + ci * swc, mask=c_mask, other=0.0).to(acc_ty)
                if ONE_GROUP:
                    xv = tl.load(x_sp + ci * sxc, mask=row_ok, other=0.0).to(acc_ty)
                    if HAS_PRO:
                        s = tl.load(scale_ptr + ci).to(acc_ty)
                        t = tl.load(shift_ptr + ci).to(acc_ty)
                        xv = tl.where(row_ok, act_fwd(xv * s + t, IN_ACT), 0.0)
                    acc += xv[:, None] * wv[None, :]
                else:
                    ch = cin0 + ci
                    x_mask = row_ok[:, None] & c_mask[None, :]
                    xv = tl.load(x_sp[:, None] + (ch * sxc)[None, :], mask=x_mask,
                                 other=0.0).to(acc_ty)
                    if HAS_PRO:
                        xv = _prologue(xv, x_mask, scale_ptr, shift_ptr, ch, c_mask, acc_ty,
                                       IN_ACT)
                    acc += xv * wv[None, :]

    _epilogue(acc, pid_m, offs_m, m_mask, co, c_mask, M, OH, OW, Cout,
              bias_ptr, res_ptr, out_ptr, ws_ptr, WS_T,
              srn, src, srh, srw, son, soc, soh, sow,
              HAS_BIAS, HAS_RES, ACT, STATS, BLOCK_M)


# ----------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _pair(v, name):
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    try:
        t = tuple(int(e) for e in v)
    except (TypeError, ValueError):
        raise ValueError(f"convkernels: conv2d_fused: {name} must be an int or a pair of ints, "
                         f"got {v!r}") from None
    if len(t) == 1:
        t = t * 2
    if len(t) != 2:
        raise ValueError(f"convkernels: conv2d_fused: {name} must have 2 elements, got {v!r}")
    return t


def _vec(v, n, dtype, device, name):
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"convkernels: conv2d_fused: {name} must be a tensor")
    if v.dim() != 1 or v.numel() != n:
        raise ValueError(f"convkernels: conv2d_fused: {name} must have shape [{n}], "
                         f"got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"convkernels: conv2d_fused: {name} is on {v.device}, x on {device}")
    return v.to(dtype).contiguous()


def _may_overlap(a, b):
    """False when no element of ``a`` can share memory with one of ``b``.

    Exact for the case that matters: disjoint channel slices of one dense
    channels_last buffer (DenseNet reads buf[:, :c] and writes buf[:, c:c+k]):
    all non-channel strides are multiples of a period P and each view's channels
    occupy a disjoint interval of residues mod P. Otherwise conservative."""
    if a is None or b is None or a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    es = a.element_size()

    def span(t):
        lo = t.data_ptr()
        return lo, lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * es

    (a0, a1), (b0, b1) = span(a), span(b)
    if a1 <= b0 or b1 <= a0:
        return False
    if b.element_size() != es or a.stride(1) != b.stride(1):
        return True
    sc = a.stride(1)
    other = [st for t in (a, b) for d, (n, st) in enumerate(zip(t.shape, t.stride()))
             if d != 1 and n > 1]
    if not other or sc < 1:
        return True
    period = min(other)
    if any(st % period for st in other):
        return True
    base = a.untyped_storage().data_ptr()
    ra = ((a.data_ptr() - base) // es) % period
    rb = ((b.data_ptr() - base) // es) % period
    ea = ra + (a.shape[1] - 1) * sc
    eb = rb + (b.shape[1] - 1) * sc
    if ea >= period or eb >= period:
        return True
    return not (ea < rb or eb < ra)


def _has_internal_overlap(t):
    """True if distinct indices of t may share memory (a conservative check)."""
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s > 1), key=lambda p: p[0])
    extent = 1
    for st, s in dims:
        if st < extent:
            return True
        extent = st * (s - 1) + extent
    return False


def _layout_code(x, w, out) -> int:
    """Which of x, the weight and out have unit channel stride (autotune key)."""
    return (x.stride(1) == 1) + 2 * (w.stride(1) == 1) + 4 * (out.stride(1) == 1)


def _needs_int64(t, first_dim: int = 1) -> bool:
    """Whether an offset within one sample of ``t`` (dims 1-3: the sample offset
    itself is int64) may pass int32; for the weight, whose every dim is
    multiplied in the kernel, first_dim=0."""
    return sum((n - 1) * st for n, st in zip(t.shape[first_dim:], t.stride()[first_dim:])) \
        >= 2**31


def _allow_tf32(x):
    return (x.dtype == torch.float32 and not _interpreting()
            and bool(torch.backends.cudnn.allow_tf32))


def _plan(cin_g, cout_g, groups, dtype):
    """'gemm' (tensor cores) or 'direct' (FMA), and TAP_MAJOR for gemm."""
    if cin_g == 1 and groups > 1:  # depthwise (any channel multiplier)
        return "direct", False
    if dtype == torch.float64 and not _interpreting():  # no fp64 tensor-core path on GPU
        return "direct", False
    if cout_g < 16:
        return "direct", False
    return "gemm", cin_g >= 16


def conv2d_fused(x, weight, bias, stride, padding, dilation, groups, in_scale=None,
                 in_shift=None, in_act="identity", residual=None, act="identity", out=None,
                 stats=False):
    """``act(conv2d(in_act(x * in_scale + in_shift), weight) + bias (+ residual))``.

    Returns ``(out, mean, var)``: mean and biased variance per output channel of
    ``conv + bias`` over (N, OH, OW) when ``stats`` (float32; float64 for float64
    x), else ``(out, None, None)``. ``out`` (optional) is a preallocated
    ``[N, Cout, OH, OW]`` tensor with any strides, e.g. a channel slice of a
    larger channels_last buffer; otherwise a new channels_last tensor is returned.
    """
    # ---- validation ----
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("convkernels: conv2d_fused: x must be a 4-D tensor [N, Cin, H, W]")
    if x.dtype not in _FLOAT:
        raise ValueError(f"convkernels: conv2d_fused: unsupported x dtype {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("convkernels: conv2d_fused: weight must be a 4-D tensor "
                         "[Cout, Cin/groups, KH, KW]")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"convkernels: conv2d_fused: weight must have x's dtype and device "
                         f"(weight {weight.dtype} on {weight.device}, x {x.dtype} on {x.device})")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"convkernels: conv2d_fused: groups must be a positive int, got {groups!r}")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if sh < 1 or sw < 1:
        raise ValueError(f"convkernels: conv2d_fused: stride must be >= 1, got {stride!r}")
    if ph < 0 or pw < 0:
        raise ValueError(f"convkernels: conv2d_fused: padding must be >= 0, got {padding!r}")
    if dh < 1 or dw < 1:
        raise ValueError(f"convkernels: conv2d_fused: dilation must be >= 1, got {dilation!r}")
    N, Cin, H, W = x.shape
    Cout, cin_g, KH, KW = weight.shape
    if Cin % groups:
        raise ValueError(f"convkernels: conv2d_fused: x channels ({Cin}) not divisible by "
                         f"groups ({groups})")
    if Cout % groups:
        raise ValueError(f"convkernels: conv2d_fused: weight out channels ({Cout}) not "
                         f"divisible by groups ({groups})")
    if cin_g != Cin // groups:
        raise ValueError(f"convkernels: conv2d_fused: weight has {cin_g} input channels per "
                         f"group, x has {Cin} channels / groups {groups} = {Cin // groups}")
    if KH < 1 or KW < 1 or Cout < 1:
        raise ValueError(f"convkernels: conv2d_fused: empty weight {tuple(weight.shape)}")
    OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"convkernels: conv2d_fused: weight kernel {KH}x{KW} (dilation "
                         f"{dh}x{dw}) is larger than the padded input "
                         f"{H + 2 * ph}x{W + 2 * pw} (padding {padding!r})")
    cout_g = Cout // groups
    code = act_code(act)
    in_code = act_code(in_act)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    if bias is not None:
        bias = _vec(bias, Cout, acc, dev, "bias")
    has_pro = in_scale is not None or in_shift is not None
    if has_pro:
        if in_scale is None or in_shift is None:
            raise ValueError("convkernels: conv2d_fused: in_scale and in_shift must be given together")
        in_scale = _vec(in_scale, Cin, acc, dev, "in_scale")
        in_shift = _vec(in_shift, Cin, acc, dev, "in_shift")
    oshape = (N, Cout, OH, OW)
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != oshape:
            raise ValueError(f"convkernels: conv2d_fused: residual must have shape {oshape}, got "
                             f"{tuple(getattr(residual, 'shape', ()))}")
        if residual.device != dev:
            raise ValueError("convkernels: conv2d_fused: residual must be on x's device")
        if residual.dtype != x.dtype:
            residual = residual.to(x.dtype)
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != oshape:
            raise ValueError(f"convkernels: conv2d_fused: out must have shape {oshape}, got "
                             f"{tuple(getattr(out, 'shape', ()))}")
        if out.dtype != x.dtype or out.device != dev:
            raise ValueError("convkernels: conv2d_fused: out must have x's dtype and device")
        if _has_internal_overlap(out):
            raise ValueError("convkernels: conv2d_fused: out has overlapping elements")
        for name, t in (("x", x), ("weight", weight), ("residual", residual)):
            if _may_overlap(out, t):
                raise ValueError(f"convkernels: conv2d_fused: out overlaps {name}")
    else:
        out = torch.empty(oshape, dtype=x.dtype, device=dev, memory_format=torch.channels_last)

    M = N * OH * OW
    if M == 0:
        if not stats:
            return out, None, None
        nan = torch.full((Cout,), float("nan"), dtype=acc, device=dev)
        return out, nan, nan.clone()
    if Cin == 0:
        raise ValueError("convkernels: conv2d_fused: x has no channels")

    kind, tap_major = _plan(cin_g, cout_g, groups, x.dtype)
    if kind == "gemm" and tap_major and x.is_cuda and x.stride(1) != 1:
        # the K dimension is the channel: gather it contiguous (one copy beats
        # strided tensor-core operand loads)
        x = x.contiguous(memory_format=torch.channels_last)
    # Weight operand loads want a unit stride along Cout (or, for the GEMM, along
    # Cin: 1x1 OIHW and channels_last weights qualify); else one small copy into
    # [KH, KW, Cin_g, Cout] order. The interpreter keeps any strides (tests).
    unit_ok = weight.stride(0) == 1 or (kind == "gemm" and weight.stride(1) == 1)
    if unit_ok or (kind == "direct" and not x.is_cuda):
        w_use = weight
    else:
        w_use = weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    # WS_T: tiles for the smallest BLOCK_M that may run; unused rows keep count 0
    ws_min_bm = MIN_BLOCK_M if (_interpreting() and CONV_INTERPRET_CONFIG is not None) \
        else STATS_MIN_BLOCK_M
    ws_t = triton.cdiv(M, ws_min_bm) if stats else 1
    if stats:
        ws = torch.empty((3, ws_t, Cout), dtype=acc, device=dev)
        ws[2].zero_()
    else:
        ws = torch.empty(1, dtype=acc, device=dev)
    dummy = torch.empty(1, dtype=acc, device=dev)
    res = residual if residual is not None else out
    args = (
        x, w_use, bias if bias is not None else dummy,
        in_scale if has_pro else dummy, in_shift if has_pro else dummy,
        res, out, ws,
        H, W, OH, OW, M, cin_g, cout_g, Cout, ws_t,
        *x.stride(), *w_use.stride(), *res.stride(), *out.stride(),
        sh, sw, ph, pw, dh, dw, _m_bucket(M), _layout_code(x, w_use, out),
    )
    flags = dict(KH=KH, KW=KW, HAS_BIAS=bias is not None, HAS_PRO=has_pro, IN_ACT=in_code,
                 HAS_RES=residual is not None, ACT=code, STATS=bool(stats),
                 IDX64=any(_needs_int64(t) for t in (x, res, out)) or _needs_int64(w_use, 0))
    with device_guard(x):
        if kind == "gemm":
            flags.update(TAP_MAJOR=tap_major, ALLOW_TF32=_allow_tf32(x))

            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]),
                        groups)

            block_m = _launch(_conv_gemm_kernel, GEMM_CONFIGS, grid, args, flags,
                    lambda c: dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], num_warps=c[3],
                                   num_stages=c[4]), _prune_gemm)
        else:
            flags.update(ONE_GROUP=groups == 1)

            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(Cout, meta["BLOCK_C"]))

            block_m = _launch(_conv_direct_kernel, DIRECT_CONFIGS, grid, args, flags,
                    lambda c: dict(BLOCK_M=c[0], BLOCK_C=c[1], num_warps=c[2], num_stages=c[3]),
                    _prune_direct)
    if not stats:
        return out, None, None
    # Rows past the tiles of the config that ran may hold a benchmarked config's
    # partials: merge only the rows that ran (counts of unused rows are 0 anyway
    # thanks to reset_to_zero; this does not rely on it).
    if block_m is not None:
        if block_m < ws_min_bm:  # never: the pruners keep BLOCK_M >= STATS_MIN_BLOCK_M
            raise RuntimeError(f"convkernels: conv2d_fused: stats ran with BLOCK_M {block_m}")
        ws = ws[:, :triton.cdiv(M, block_m)]
    mean, var = _merge_stats(ws)
    return out, mean.to(acc), var.to(acc)


def _launch(kernel, configs, grid, args, flags, cfg_kwargs, prune):
    """Launch; returns the BLOCK_M that ran (None if unknown)."""
    if not _interpreting():
        kernel[grid](*args, **flags)
        best = getattr(kernel, "best_config", None)
        return None if best is None else best.kwargs.get("BLOCK_M")
    # interpreter: no autotuning; a fixed config (tests set CONV_INTERPRET_CONFIG
    # to sweep them all), else the first config the pruner keeps
    if CONV_INTERPRET_CONFIG is not None:
        cfg = configs[CONV_INTERPRET_CONFIG % len(configs)]
        meta = cfg_kwargs(cfg)
    else:
        named = dict(zip(kernel.arg_names, args))
        kept = prune(kernel.configs, named, **flags)
        c0 = kept[0]
        meta = dict(c0.kwargs, num_warps=c0.num_warps, num_stages=c0.num_stages)
    kernel.fn[grid](*args, **flags, **meta)
    return meta["BLOCK_M"]


def _merge_stats(ws):
    """Chan's parallel merge of per-tile (mean, M2, count) -> (mean, biased var)."""
    w = ws.to(torch.float64)
    t_mean, t_m2, cnt = w[0], w[1], w[2]
    used = cnt > 0
    total = cnt.sum(0)
    mean = torch.where(used, cnt * t_mean, 0.0).sum(0) / total
    d = t_mean - mean[None, :]
    m2 = torch.where(used, t_m2 + cnt * d * d, 0.0).sum(0)
    return mean, m2 / total


# ----------------------------------------------------------------------------
# ahead-of-time compile table (tests/test_triton_compile.py)
# ----------------------------------------------------------------------------


def _unwrap(fn):
    """The jitted function under @triton.autotune / @triton.heuristics."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn
    return fn


_STRIDES = ("sxc", "sxh", "sxw", "swo", "swc", "swh", "sww", "src", "srh", "srw", "soc", "soh",
            "sow")


def _case(kernel, label, dt, consts, *, cl, num_warps, num_stages, w_cin_unit=False,
          wide=False):
    """CompileCase with the stride-1 specialisations the JIT makes at run time:
    channel strides of x / residual / out (channels_last) and of the permuted weight.
    ``wide``: int64 strides (what the JIT passes for a stride >= 2**31); IDX64
    cases without it have int32 strides whose products overflow."""
    fn = _unwrap(kernel)
    t = "*" + TRITON_TYPE[dt]
    acc = "*fp64" if dt == torch.float64 else "*fp32"
    ptr = dict(x_ptr=t, w_ptr=t, res_ptr=t, out_ptr=t, bias_ptr=acc, scale_ptr=acc,
               shift_ptr=acc, ws_ptr=acc)
    unit = {"swc" if w_cin_unit else "swo"} | ({"sxc", "src", "soc"} if cl else {"sxw", "srw", "sow"})
    sig, cx = case_signature(fn, ptr, consts, unit)
    if wide:
        sig.update({a: "i64" for a in _STRIDES if sig[a] == "i32"})
    wl = ",wci" if w_cin_unit else ""
    return CompileCase(f"{fn.__name__}[{label},{'cl' if cl else 'nchw'}{wl}"
                       f"{',i64' if wide else ''}]", fn, sig, cx, num_warps, num_stages)


_ACTS = list(ACT_CODES)


def compile_cases():
    """Every config of both kernels (fp32 / fp16 / bf16, both K loops, both direct
    variants), every act and in_act, prologue / residual / stats on and off."""
    cases = []
    dts = (torch.float16, torch.bfloat16, torch.float32)
    for i, (bm, bn, bk, w, s) in enumerate(GEMM_CONFIGS):
        for j, dt in enumerate(dts):
            if dt == torch.float32 and (bm, bn, bk, w, s) in _GEMM_HALF_ONLY:
                continue
            k = i * len(dts) + j
            tap = k % 2 == 0
            act = _ACTS[k % 4]
            in_act = _ACTS[(k + 1) % 4]
            pro, res, st = k % 3 == 0, k % 3 == 1, k % 2 == 1
            tf32 = dt == torch.float32 and k % 2 == 0
            idx64 = (i + j) % 3 == 1
            kh = 3 if tap else 7
            consts = dict(KH=kh, KW=kh, TAP_MAJOR=tap, ALLOW_TF32=tf32, HAS_BIAS=k % 2 == 0,
                          HAS_PRO=pro, IN_ACT=ACT_CODES[in_act], HAS_RES=res,
                          ACT=ACT_CODES[act], STATS=st, IDX64=idx64, BLOCK_M=bm,
                          BLOCK_N=bn, BLOCK_K=bk)
            label = (f"{TRITON_TYPE[dt]},{bm}x{bn}x{bk}w{w}s{s},{'tap' if tap else 'im2col'},"
                     f"tf32={int(tf32)},{act},pro={int(pro)}:{in_act},res={int(res)},"
                     f"stats={int(st)},idx64={int(idx64)}")
            cases.append(_case(_conv_gemm_kernel, label, dt, consts, cl=k % 5 != 4,
                               num_warps=w, num_stages=s, w_cin_unit=k % 7 == 3,
                               wide=idx64 and i % 2 == 0))
    for i, (bm, bc, w, s) in enumerate(DIRECT_CONFIGS):
        for j, dt in enumerate(dts):
            k = i * len(dts) + j
            one = k % 3 == 0
            act = _ACTS[k % 4]
            in_act = _ACTS[(k + 2) % 4]
            pro, res, st = k % 2 == 0, k % 3 == 1, k % 2 == 1
            idx64 = (i + j) % 3 == 1
            consts = dict(KH=3, KW=3, ONE_GROUP=one, HAS_BIAS=k % 2 == 1, HAS_PRO=pro,
                          IN_ACT=ACT_CODES[in_act], HAS_RES=res, ACT=ACT_CODES[act], STATS=st,
                          IDX64=idx64, BLOCK_M=bm, BLOCK_C=bc)
            label = (f"{TRITON_TYPE[dt]},{bm}x{bc}w{w}s{s},one_group={int(one)},{act},"
                     f"pro={int(pro)}:{in_act},res={int(res)},stats={int(st)},"
                     f"idx64={int(idx64)}")
            cases.append(_case(_conv_direct_kernel, label, dt, consts, cl=k % 4 != 3,
                               num_warps=w, num_stages=s, wide=idx64 and i % 2 == 0))
    return cases


__all__ = ["conv2d_fused", "compile_cases", "GEMM_CONFIGS", "DIRECT_CONFIGS"]
