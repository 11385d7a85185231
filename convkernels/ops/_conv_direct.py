"""convkernels' own NHWC convolution for CPU fp32 inference
(csrc/cpu/conv_nhwc_cpu.cpp), where it is at least as fast as oneDNN.

It takes a channels_last input with at least 16 channels, groups == 1, a
1x1 conv or a small kxk one (below), and relu, identity, silu or sigmoid
after bias (+ residual), all applied in registers (oneDNN needs a separate
pass for relu: its post-op maps NaN to 0). The weight is packed once into
the kernel's [ceil(Cout/16), KH, KW, Cin, 16] panels and cached until it
changes. The kernel runs with AVX-512 where the CPU has it (as oneDNN does)
and AVX2 elsewhere; ``torch.ops.convkernels_C.conv_isa()`` names the one in use.

Measured against oneDNN on a prepacked weight (plus the relu pass; SiLU as
its post-op), taking turns on the same tensors (benchmarks/bench_cpu_conv.py,
2 threads). The choice below made the models' convs at batch 1 faster in
sum: on a 2-core Intel Xeon VM with AVX-512 (2026-12-04), 1.08x (ResNet-50),
1.10x (DenseNet-121), 1.28x (EfficientNet-B0's 1x1 convs), 1.05x
(GoogLeNet), 1.00x (VGG-16), and at batch 8 1.15x, 1.01x, 1.71x, 1.01x,
1.00x; on an AVX2-only AMD EPYC VM
1.05-1.06x, 1.07-1.14x, 1.20-1.29x, 1.04-1.07x, and 0.99-1.01x at batch 8.
(On the Intel VM the kernel's AVX2 tiles ran at 0.5-0.7x the speed of
oneDNN's AVX-512 code, which is why it has AVX-512 tiles.) The stem's
3-channel conv and grouped convs stay on oneDNN. Depthwise convs (groups ==
channels) run direct (``dwconv2d_nhwc_``: a tap's weight vectors serve 4
pixels) at batch 1 and, at any batch, 3x3 ones: EfficientNet-B0's, SiLU
after, on the Intel VM ran 1.03-5.8x oneDNN's speed at batch 1 and at batch 8
1.02-2.8x for 3x3 but 0.69-1.09x for 5x5, which stay on oneDNN there
(MobileNetV2 eval b8: 46.5 -> 44.3 ms, EfficientNet-B0 b8 unchanged).
"""
from __future__ import annotations

import functools

import torch

from ._checks import conv_output_size
from ._fold import FOLD_CACHE
from ._library import into, memory_format
from .primitives import is_channel_slice

_PANEL = 16  # output channels of a packed panel (two AVX2 vectors, one AVX-512 vector)
_ACTS = ("relu", "identity", "silu", "sigmoid")
_MIN_CIN = 16  # fewer input channels: the per-tap overhead dominates
# oneDNN's blocking is ahead on large compute-bound convs: more output pixels
# (batch x OH x OW) than _MAX_PIXELS (0.8-0.9x at batch 8 on 56x56 images), or
# a kxk conv (k > 1) of more than _MAX_KXK_FLOPS (0.89-0.96x at 170-700 MFLOP).
# Below them oneDNN's per-call cost (~50 us) is much of a small conv's time.
_MAX_PIXELS = 8192
_MAX_KXK_FLOPS = 100e6
# A 1x1 conv of this few input channels runs direct at any size: oneDNN is
# slow there (EfficientNet-B0's 16->96 + SiLU on 112x112: 1.12x at batch 1,
# 3.65x at batch 8, Intel Xeon VM, AVX-512). So does every 1x1 conv with the
# AVX-512 tiles: at batch 8 on 56x56 images they ran 1.00-1.13x oneDNN's
# speed (7.5x on ResNet-50's 64->64), so the pixel limit (from the AVX2
# tiles on the AMD VM) is for the kxk convs and AVX2 alone.
_FEW_CIN = 16
# With the AVX-512 tiles a kxk conv at batch 1 runs direct at any FLOP count up
# to a 56x56 output: on ResNet-50's 3x3 convs and DenseNet's 128 -> 32 it ran
# 0.96-1.22x oneDNN's speed (8 of 9 faster; batch 8: 0.94-1.07x, left to the
# limits above). Intel Xeon VM, 2 threads, 2026-12-04.
_MAX_AVX512_KXK_PIXELS = 56 * 56
# Depthwise convs run direct at batch 1, and above it up to this kernel size.
_DW_K = 3


@functools.lru_cache(maxsize=None)
def _built_with_avx2() -> bool:
    return torch.ops.convkernels_C.conv_isa() != "none"


def _depthwise(x, weight, groups) -> bool:
    return groups > 1 and groups == x.size(1) == weight.size(0) and weight.size(1) == 1


def direct_pays(x, weight, stride, padding, dilation, groups, act) -> bool:
    """Whether the direct kernel takes this conv (see the module docstring)."""
    if not (act in _ACTS and memory_format(x) == torch.channels_last and _built_with_avx2()):
        return False
    if groups != 1:
        return _depthwise(x, weight, groups) and (x.size(0) == 1 or weight.size(-1) <= _DW_K)
    if weight.size(1) < _MIN_CIN:
        return False
    one_by_one = tuple(weight.shape[2:]) == (1, 1)
    if one_by_one and (weight.size(1) <= _FEW_CIN
                       or torch.ops.convkernels_C.conv_isa() == "avx512"):
        return True
    oh, ow = conv_output_size("conv", x, weight, stride, padding, dilation)
    pixels = x.size(0) * oh * ow
    if (x.size(0) == 1 and pixels <= _MAX_AVX512_KXK_PIXELS
            and torch.ops.convkernels_C.conv_isa() == "avx512"):
        return True
    return pixels <= _MAX_PIXELS and (one_by_one or 2 * pixels * weight.numel() <= _MAX_KXK_FLOPS)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [Cout, Cin, KH, KW] as [ceil(Cout/16), KH, KW, Cin, 16], zero-padded."""
    cout, cin, kh, kw = weight.shape
    panels = -(-cout // _PANEL)
    padded = weight.new_zeros((panels * _PANEL, cin, kh, kw))
    padded[:cout] = weight
    return padded.view(panels, _PANEL, cin, kh, kw).permute(0, 3, 4, 2, 1).contiguous()


def pack_depthwise(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise ``weight`` [C, 1, KH, KW] as [KH, KW, C]: a tap's C weights contiguous."""
    return weight[:, 0].permute(1, 2, 0).contiguous()


def direct_plan(x, weight, bias, stride, padding, dilation, act, residual, groups=1):
    """``run(x, residual, out)`` for inputs shaped as ``x``, computing
    ``act(conv2d(x, weight) + bias (+ residual))`` channels_last (groups 1, or
    depthwise), straight into ``out`` where out is a channels_last channel
    slice and no residual is read (the kernel's output may not overlap its
    inputs, which a residual view of out could)."""
    if groups == 1:
        packed = FOLD_CACHE.get((weight,), ("direct-packed",), lambda: pack(weight.detach()))
        kernel = torch.ops.convkernels_C.conv2d_nhwc_
    else:
        packed = FOLD_CACHE.get((weight,), ("direct-packed-depthwise",),
                                lambda: pack_depthwise(weight.detach()))
        kernel = torch.ops.convkernels_C.dwconv2d_nhwc_
    args = (list(stride), list(padding), list(dilation), act)
    shape = (x.size(0), weight.size(0), *conv_output_size("conv", x, weight, stride, padding,
                                                          dilation))

    def run(x, residual, out):
        direct = (out is not None and residual is None
                  and is_channel_slice(out, torch.channels_last))
        y = out if direct else torch.empty(shape, dtype=x.dtype,
                                           memory_format=torch.channels_last)
        kernel(y, x, packed, bias, residual, *args)
        return y if out is None or direct else into(y, out)
    return run
