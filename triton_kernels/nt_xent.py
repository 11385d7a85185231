"""NT-Xent (SimCLR) primitives: nt_xent_forward, nt_xent_backward (see
convkernels/ops/primitives.py).

``z`` is ``[M, D]`` row-major. A first kernel writes the row norms ``[M]``; the
loss kernels then normalise tiles as they load them (``u = z / max(|z|, eps)``,
cast back to z's dtype so that ``tl.dot`` runs on tensor cores for fp16/bf16,
accumulating in fp32). One program owns BLOCK_M rows and loops over blocks of
BLOCK_N columns, each similarity tile a ``tl.dot`` over D in BLOCK_K chunks: the
M x M matrix never exists. The forward keeps an online max/sum per row; the
backward recomputes every tile, with a second grid axis over D chunks of the
gradient (BLOCK_K wide), so that its accumulator stays BLOCK_M x BLOCK_K for any D.
All block sizes are >= 16, as ``tl.dot`` requires.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import TRITON_TYPE, CompileCase, acc_dtype, case_signature, device_guard

EPS = tl.constexpr(1e-12)  # F.normalize's (a constexpr: jit code reads no other globals)
# (BLOCK_M, BLOCK_N, num_warps): the larger tile once there are enough row blocks
# to fill the GPU with it.
TILES = ((32, 32, 4), (64, 64, 4))
BLOCK_KS = (16, 32, 64)
NORM_BLOCK_M = 32


def _pick(M: int, D: int, device: torch.device):
    block_k = min(max(triton.next_power_of_2(D), BLOCK_KS[0]), BLOCK_KS[-1])
    big = TILES[1]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if triton.cdiv(M, big[0]) >= torch.cuda.get_device_properties(index).multi_processor_count:
            return big, block_k
    return TILES[0], block_k


@triton.jit
def _dot(a, b, acc):
    # fp32 inputs: exact fp32 products (tf32 would cost 3 digits of the loss).
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_rows(z_ptr, rows, k0, M, D, BLOCK_K: tl.constexpr):
    """z[rows, k0:k0+BLOCK_K] in fp32 (0 past the ends) and the feature indices."""
    k = k0 + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (k < D)[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + k[None, :], mask=mask, other=0.0)
    return z.to(tl.float32), k


@triton.jit
def _unit_rows(z_ptr, norm_ptr, rows, k0, M, D, BLOCK_K: tl.constexpr):
    """u[rows, k0:k0+BLOCK_K] = z / max(|z|, eps), in z's dtype (the dot's operand)."""
    z, _ = _load_rows(z_ptr, rows, k0, M, D, BLOCK_K)
    n = tl.load(norm_ptr + rows, mask=rows < M, other=1.0)
    return (z / tl.maximum(n, EPS)[:, None]).to(z_ptr.dtype.element_ty)


@triton.jit
def _sim_tile(z_ptr, norm_ptr, rows, cols, M, D, inv_t, acc_ty,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """s[rows, cols] = <u_rows, u_cols> / temperature, in acc_ty."""
    s = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    for k0 in range(0, D, BLOCK_K):
        a = _unit_rows(z_ptr, norm_ptr, rows, k0, M, D, BLOCK_K)
        b = _unit_rows(z_ptr, norm_ptr, cols, k0, M, D, BLOCK_K)
        s = _dot(a, tl.trans(b), s)
    return s * inv_t


@triton.jit
def _nt_xent_norm_kernel(z_ptr, norm_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """norm[i] = |z_i| (accumulated in norm's dtype)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ss = tl.zeros((BLOCK_M,), norm_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_K):
        z, _ = _load_rows(z_ptr, rows, k0, M, D, BLOCK_K)
        z = z.to(norm_ptr.dtype.element_ty)
        ss += tl.sum(z * z, axis=1)
    tl.store(norm_ptr + rows, tl.sqrt(ss), mask=rows < M)


@triton.jit
def _nt_xent_fwd_kernel(z_ptr, norm_ptr, loss_ptr, lse_ptr, M, N, D, inv_t,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """lse_i = logsumexp_{j != i} s_ij (online over column blocks), loss_i = lse_i - s_{i,p(i)}."""
    acc_ty = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = (rows + N) % M
    m = tl.full((BLOCK_M,), float("-inf"), acc_ty)
    l = tl.zeros((BLOCK_M,), acc_ty)
    s_pos = tl.zeros((BLOCK_M,), acc_ty)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s = _sim_tile(z_ptr, norm_ptr, rows, cols, M, D, inv_t, acc_ty, BLOCK_M, BLOCK_N, BLOCK_K)
        s_pos += tl.sum(tl.where(cols[None, :] == pos[:, None], s, 0.0), axis=1)
        s = tl.where((cols[None, :] < M) & (cols[None, :] != rows[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row with no valid column yet has m_new = -inf: shift by 0 there, so
        # that exp(-inf - shift) is 0 rather than NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(l)
    tl.store(lse_ptr + rows, lse, mask=rows < M)
    tl.store(loss_ptr + rows, lse - s_pos, mask=rows < M)


@triton.jit
def _nt_xent_bwd_kernel(z_ptr, norm_ptr, lse_ptr, grad_ptr, gz_ptr, M, N, D, inv_t,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_z[rows, k-chunk] (program_id(1) = the chunk) from the recomputed tiles:
    W = exp(s - lse_row) + exp(s - lse_col) off the diagonal, -2 at the positive."""
    acc_ty = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    pos = (rows + N) % M
    lse_r = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_K), acc_ty)  # sum_j W_ij u_j over this chunk
    r = tl.zeros((BLOCK_M,), acc_ty)  # sum_j W_ij s_ij
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s = _sim_tile(z_ptr, norm_ptr, rows, cols, M, D, inv_t, acc_ty, BLOCK_M, BLOCK_N, BLOCK_K)
        lse_c = tl.load(lse_ptr + cols, mask=cols < M, other=0.0)
        valid = (cols[None, :] < M) & (cols[None, :] != rows[:, None])
        w = tl.where(valid, tl.exp(s - lse_r[:, None]) + tl.exp(s - lse_c[None, :]), 0.0)
        w -= tl.where(cols[None, :] == pos[:, None], 2.0, 0.0)
        r += tl.sum(w * s, axis=1)
        u_c = _unit_rows(z_ptr, norm_ptr, cols, k0, M, D, BLOCK_K)
        acc = _dot(w.to(u_c.dtype), u_c, acc)
    c = tl.load(grad_ptr).to(acc_ty) / M
    n = tl.load(norm_ptr + rows, mask=rows < M, other=1.0)
    z_r, k = _load_rows(z_ptr, rows, k0, M, D, BLOCK_K)
    denom = tl.maximum(n, EPS)
    # <u_i, g_u_i> = c r_i; past the clamp (|z_i| <= eps) the norm is a constant.
    proj = tl.where(n > EPS, c * r, 0.0)
    gz = (c * inv_t * acc - proj[:, None] * (z_r / denom[:, None])) / denom[:, None]
    mask = (rows < M)[:, None] & (k < D)[None, :]
    tl.store(gz_ptr + rows.to(tl.int64)[:, None] * D + k[None, :],
             gz.to(gz_ptr.dtype.element_ty), mask=mask)


def _norms(z: torch.Tensor, block_k: int) -> torch.Tensor:
    if z.dim() != 2 or z.size(0) % 2 or z.size(0) == 0 or z.size(1) == 0:
        raise ValueError(f"convkernels: z must be [2N, D] with N, D >= 1, got {tuple(z.shape)}")
    M, D = z.shape
    norm = torch.empty(M, dtype=acc_dtype(z.dtype), device=z.device)
    _nt_xent_norm_kernel[(triton.cdiv(M, NORM_BLOCK_M),)](
        z, norm, M, D, BLOCK_M=NORM_BLOCK_M, BLOCK_K=block_k)
    return norm


def nt_xent_forward(z, temperature):
    """(row_loss, lse), ``[M]`` each in the accumulation dtype."""
    z = z.contiguous()
    M, D = z.shape
    (bm, bn, warps), bk = _pick(M, D, z.device)
    row_loss = torch.empty(M, dtype=acc_dtype(z.dtype), device=z.device)
    lse = torch.empty_like(row_loss)
    with device_guard(z):
        norm = _norms(z, bk)
        _nt_xent_fwd_kernel[(triton.cdiv(M, bm),)](
            z, norm, row_loss, lse, M, M // 2, D, 1.0 / temperature,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return row_loss, lse


def nt_xent_backward(grad, z, lse, temperature):
    """grad_z in z's dtype; ``grad`` the 0-dim gradient of the mean loss."""
    z = z.contiguous()
    M, D = z.shape
    (bm, bn, warps), bk = _pick(M, D, z.device)
    lse = lse.to(acc_dtype(z.dtype)).contiguous()
    grad = grad.to(acc_dtype(z.dtype)).reshape(1)
    gz = torch.empty_like(z)
    with device_guard(z):
        norm = _norms(z, bk)
        _nt_xent_bwd_kernel[(triton.cdiv(M, bm), triton.cdiv(D, bk))](
            z, norm, lse, grad, gz, M, M // 2, D, 1.0 / temperature,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return gz


# ----------------------------------------------------------------------------
# ahead-of-time compile table: every tile x BLOCK_K x dtype
# ----------------------------------------------------------------------------


def _case(fn, label, ptr_types, consts, warps):
    sig, cx = case_signature(fn, ptr_types, consts)
    if "inv_t" in sig:
        sig["inv_t"] = "fp32"
    return CompileCase(f"{fn.__name__}[{label}]", fn, sig, cx, warps)


def compile_cases():
    cases = []
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        t = "*" + TRITON_TYPE[dt]
        for bk in BLOCK_KS:
            cases.append(_case(_nt_xent_norm_kernel, f"{TRITON_TYPE[dt]},{NORM_BLOCK_M},{bk}",
                               dict(z_ptr=t, norm_ptr="*fp32"),
                               dict(BLOCK_M=NORM_BLOCK_M, BLOCK_K=bk), 4))
            for bm, bn, warps in TILES:
                label = f"{TRITON_TYPE[dt]},{bm}x{bn}x{bk}"
                consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                cases.append(_case(_nt_xent_fwd_kernel, label,
                                   dict(z_ptr=t, norm_ptr="*fp32", loss_ptr="*fp32", lse_ptr="*fp32"),
                                   consts, warps))
                cases.append(_case(_nt_xent_bwd_kernel, label,
                                   dict(z_ptr=t, norm_ptr="*fp32", lse_ptr="*fp32",
                                        grad_ptr="*fp32", gz_ptr=t), consts, warps))
    return cases
