"""The kernel primitives every native backend implements.

The public ops (bn_act, add_act, ...) are written once, in Python, on top of
these primitives: per-channel arithmetic on C-sized vectors (folding BN into a
scale and shift, the backward coefficients, running-stat updates) is shared by
all backends, and each backend only supplies the passes over the big tensors.

Backends: ``convkernels._C`` (C++ for CPU tensors and CUDA C++ for CUDA tensors,
registered as ``torch.ops.convkernels_C.*``) and ``convkernels.triton_kernels``
(Triton; CPU tensors only under ``TRITON_INTERPRET=1``). Both expose functions
with exactly these names and signatures.

Contract, shared by all primitives:

* ``x``, ``grad_y`` and ``residual`` are 4-D ``[N, C, H, W]`` tensors of one
  floating dtype (fp32, fp16, bf16; fp64 on CPU) and one device, all dense in
  the same memory format: NCHW-contiguous or channels_last-contiguous (the
  caller makes them so; see :func:`bn_input` for the one exception). Outputs
  are dense in that format.
* Per-channel vectors (``scale``, ``shift``, ``center``, ``k1``..``k3``, the
  returned statistics) are contiguous ``[C]`` tensors of the accumulation dtype:
  float64 when x is float64, else float32. ``scale`` of add_act is ``[N]`` of the
  same accumulation dtype. All arithmetic is done in the accumulation dtype.
* ``act`` is one of ``"relu"``, ``"identity"``, ``"silu"``, ``"sigmoid"``.
  Backward primitives recompute the pre-activation ``z`` from their inputs;
  nothing but the inputs is ever stored.

channel_stats(x) -> (mean, var)
    Per-channel mean and *biased* variance over N, H, W.

bn_act_apply(x, scale, shift, residual, act) -> y
    ``y = act(x * scale[c] + shift[c] (+ residual))``, in x's dtype.

bn_act_backward_reduce(grad_y, x, scale, shift, residual, act, center) -> (sum_gz, sum_gz_xc)
    With ``z = x * scale[c] + shift[c] (+ residual)`` and
    ``gz = grad_y * act'(z)``: per-channel ``sum(gz)`` and
    ``sum(gz * (x - center[c]))`` over N, H, W.

bn_act_backward_apply(grad_y, x, scale, shift, residual, act, k1, k2, k3,
                      need_grad_x, need_grad_residual) -> (grad_x, grad_residual)
    ``grad_x = k1[c] * gz + k2[c] * x + k3[c]`` and ``grad_residual = gz``, in
    x's dtype, in one pass; an output not asked for is returned as None. Where
    ``k2[c]`` is 0 (eval) the x term is left out: x may be infinite there, and
    torch's gradient is finite.

bn_act_apply_(x, scale, shift, residual, act) -> None   (compiled CPU kernels only)
    bn_act_apply written over ``x`` (which may be a channel slice): the
    epilogue of the CPU backend's GEMM convs (ops/_gemm1x1.py), called
    directly as ``torch.ops.convkernels_C.bn_act_apply_``.

conv2d_nhwc_(out, x, packed, bias, residual, stride, padding, dilation, act) -> None
    (compiled CPU kernels, AVX2 builds only) fp32 ``out = act(conv2d(x, w) +
    bias (+ residual))`` with groups 1 and act relu, identity, silu or
    sigmoid; ``x``, ``out`` and ``residual`` have unit channel stride
    (channels_last or a channel slice of it) and ``out`` overlaps neither;
    ``packed`` is ``w`` as ops/_conv_direct.py's ``pack`` lays it out. CPU
    inference convs call it directly as ``torch.ops.convkernels_C.conv2d_nhwc_``
    (ops/_conv_direct.py). It runs with AVX-512 tiles where the CPU has
    AVX-512F, else AVX2 ones: ``conv_isa() -> str`` names the instruction set
    in use, ``set_conv_isa(isa) -> str`` picks one the CPU has (for tests and
    benchmarks) and returns the previous one.

dwconv2d_nhwc_(out, x, packed, bias, residual, stride, padding, dilation, act) -> None
    (compiled CPU kernels, AVX2 builds only) conv2d_nhwc_ for a depthwise conv
    (groups == channels, ``out`` with x's channels), ``packed`` the weight as
    ``[KH, KW, C]`` (ops/_conv_direct.py's ``pack_depthwise``).

squeeze_excite(x, w1, b1, w2, b2, act, gate) -> y   (compiled CPU kernels only)
    A squeeze-and-excitation block for inference (no autograd), fp32 or fp64:
    ``y = x * gate(fc2(act(fc1(mean_hw(x)))))[n, c]`` with ``fc1``, ``fc2`` the
    1x1 convs of weights ``w1`` ``[Cr, C, 1, 1]``, ``w2`` ``[C, Cr, 1, 1]`` and
    optional biases; ``act`` and ``gate`` name activations as ``act`` does. The
    fused CPU forward of torchvision's ``SqueezeExcitation`` calls it directly as
    ``torch.ops.convkernels_C.squeeze_excite`` (fuse/mobile.py).

add_act_forward(x, residual, scale, act) -> y
    ``y = act(residual + scale[n] * x)`` (``scale`` None means 1).

add_act_backward(grad_y, x, residual, scale, act, need_grad_x, need_grad_residual)
    -> (grad_x, grad_residual)
    With ``gz = grad_y * act'(residual + scale[n] * x)``:
    ``grad_x = scale[n] * gz`` and ``grad_residual = gz``; None if not asked for.

highway_gate_forward(h, gate, x) -> y
    ``y = h * t + x * (1 - t)`` with ``t = sigmoid(gate)`` (computed in that
    form, as the eager formula rounds; no parameters: any dense layout is a
    flat range).

highway_gate_backward(grad_y, h, gate, x, need_grad_h, need_grad_gate, need_grad_x)
    -> (grad_h, grad_gate, grad_x)
    With t recomputed from gate: ``grad_h = grad_y * t``, ``grad_x = grad_y * (1 - t)``,
    ``grad_gate = (grad_y * h - grad_y * x) * (1 - t) * t`` (autograd's order); None
    if not asked for.

The NT-Xent primitives take ``z``: the stacked views ``[M, D]`` (M = 2N even),
contiguous, of one floating dtype, with ``u_i = z_i / max(|z_i|, 1e-12)``
(F.normalize's eps), ``s_ij = <u_i, u_j> / temperature`` and ``p(i) = (i + M/2) % M``.
Neither ever holds the M x M matrix of ``s``: rows are processed in blocks
against blocks of columns (normalised copies of z's rows are allowed).

nt_xent_forward(z, temperature) -> (row_loss, lse)
    ``lse_i = logsumexp_{j != i} s_ij`` (an online logsumexp over column blocks)
    and ``row_loss_i = lse_i - s_{i,p(i)}``: ``[M]`` vectors of the accumulation dtype.

nt_xent_backward(grad, z, lse, temperature) -> grad_z
    ``grad``: the 0-dim gradient of the *mean* loss (accumulation dtype); ``lse``:
    the forward's. With ``P_ij = exp(s_ij - lse_i)`` (0 for j = i),
    ``W_ij = P_ij + P_ji - 2 [j = p(i)]`` (s is symmetric) and ``c = grad / M``:
    ``g_u_i = (c / temperature) * sum_j W_ij u_j``, ``r_i = sum_j W_ij s_ij``
    (so that ``<u_i, g_u_i> = c r_i`` needs no second pass over D), and
    ``grad_z_i = (g_u_i - c r_i u_i) / |z_i|``, or ``g_u_i / 1e-12`` where
    ``|z_i| <= 1e-12`` (the clamp passes no gradient to the norm). In z's dtype.
"""
from __future__ import annotations

import torch

NAMES = (
    "channel_stats",
    "bn_act_apply",
    "bn_act_backward_reduce",
    "bn_act_backward_apply",
    "add_act_forward",
    "add_act_backward",
    "highway_gate_forward",
    "highway_gate_backward",
    "nt_xent_forward",
    "nt_xent_backward",
)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the per-channel vectors for a tensor of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class CompiledKernels:
    """The primitives of ``convkernels._C`` (one object, CPU and CUDA alike)."""

    # The CPU kernels of the BN primitives (channel_stats, bn_act_*) also take
    # an ``x`` that is a channel slice of a dense tensor, reading it in place
    # (csrc/cpu/channel_loops.h, Layout::xrow).
    @staticmethod
    def reads_channel_slices(x: torch.Tensor) -> bool:
        return x.device.type == "cpu"

    def __getattr__(self, name):
        if name not in NAMES:
            raise AttributeError(name)
        return getattr(torch.ops.convkernels_C, name)


def is_channel_slice(x: torch.Tensor, fmt: torch.memory_format) -> bool:
    """x is a channel slice of a tensor dense in ``fmt``: its strides but for a
    larger batch stride (NCHW) or pixel stride (channels_last)."""
    if x.dim() != 4:
        return False
    _, c, h, w = x.shape
    s = x.stride()
    if fmt == torch.channels_last:
        return s[1] == 1 and s[3] >= c and s[2] == w * s[3] and s[0] == h * w * s[3]
    return s[3] == 1 and s[2] == w and s[1] == h * w and s[0] >= c * h * w


def bn_input(k, x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``x`` as the BN primitives of kernels ``k`` take it (x is their ``x``
    argument): a channel slice as is where ``k`` reads slices in place (a
    DenseNet block's buffer prefix: no copy), else dense in ``fmt``."""
    reads = getattr(k, "reads_channel_slices", None)
    if reads is not None and reads(x) and is_channel_slice(x, fmt):
        return x
    return x.contiguous(memory_format=fmt)
