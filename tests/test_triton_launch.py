"""The GPU-only launch logic of the Triton kernels, driven on the CPU: the conv
autotuner's key and pruning (its benchmark and launch replaced by fakes), and
offsets within one sample past 2**31 elements (the interpreter computes them as
the GPU does, in the kernels' integer types)."""
import os
import subprocess
import sys

import pytest
import torch

from convkernels import backend

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from convkernels.triton_kernels.layout import tile_2d  # noqa: E402

pytestmark = pytest.mark.skipif(not backend.available("triton", "cpu"),
                                reason="triton not importable (interpreter)")


@pytest.fixture
def fake_autotune(monkeypatch):
    """conv2d_fused through @triton.autotune as on a GPU: each config's 'time' is
    its BLOCK_M (the smallest tile wins, as for a small late layer in eval), and
    the launch only records (kernel, config, args)."""
    from convkernels.triton_kernels import conv

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # conv2d_fused takes the autotuned path
    launched = []
    for kernel in (conv._conv_gemm_kernel, conv._conv_direct_kernel):
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_bench",
                            lambda *args, config, **kw: [float(config.kwargs["BLOCK_M"])] * 3)

        def record(*args, kernel=kernel, **kwargs):
            launched.append((kernel, kwargs, args))

        monkeypatch.setattr(kernel.fn, "run", record)
    return conv, launched


def _ws(conv, kernel, args):
    return args[kernel.arg_names.index("ws_ptr")]


@pytest.mark.parametrize("groups", [1, 64], ids=["gemm", "direct-depthwise"])
def test_stats_call_never_reuses_an_eval_config(fake_autotune, groups):
    """An eval call caches a small-BLOCK_M config; the training call of the same
    layer must not reuse it: its workspace has rows for BLOCK_M >= 64 only."""
    conv, launched = fake_autotune
    x = torch.randn(64, 64, 7, 7)  # M = 3136, a late-stage layer at batch 64
    w = torch.randn(64, 64 // groups, 3, 3)
    conv.conv2d_fused(x, w, None, 1, 1, 1, groups, stats=False)
    kernel, kw, _ = launched[-1]
    assert kw["BLOCK_M"] < conv.STATS_MIN_BLOCK_M  # the fake timing made eval pick a small tile
    conv.conv2d_fused(x, w, None, 1, 1, 1, groups, stats=True)
    kernel, kw, args = launched[-1]
    m = 64 * 7 * 7
    assert kw["BLOCK_M"] >= conv.STATS_MIN_BLOCK_M
    assert _ws(conv, kernel, args).shape[1] >= -(-m // kw["BLOCK_M"])  # every tile has its row
    assert len(kernel.cache) == 2


def test_autotune_key_has_groups_cout_and_layout(fake_autotune):
    """Depthwise layers of different widths, and the same layer in the other
    layout, are tuned separately."""
    conv, launched = fake_autotune
    for c in (32, 64):
        conv.conv2d_fused(torch.randn(2, c, 8, 8), torch.randn(c, 1, 3, 3), None, 1, 1, 1, c)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    conv.conv2d_fused(x, torch.randn(64, 1, 3, 3), None, 1, 1, 1, 64)
    assert len(conv._conv_direct_kernel.cache) == 3


# One sample whose channels are 2**31 / (c - 1) elements apart: every stride
# fits int32, the offset of the last channel does not. The storage (8 GiB) is
# allocated but never written except where the view lies (a few pages).
_HUGE = """
import sys
import torch, torch.nn.functional as F
from convkernels.triton_kernels.conv import conv2d_fused
which = sys.argv[1]

def huge(c, w):
    s = 2 ** 31 // (c - 1) + 1
    store = torch.empty((c - 1) * s + w)
    v = store.as_strided((1, c, 1, w), ((c - 1) * s + w, s, w, 1))
    v.copy_(torch.randn(1, c, 1, w))
    return v

x = torch.randn(1, 3, 1, 4)
for cout in (16, 3):  # gemm (im2col loop), direct
    w = torch.randn(cout, 3, 1, 1)
    ref = F.conv2d(x, w)
    if which == "x":
        y = conv2d_fused(huge(3, 4).copy_(x), w, None, 1, 0, 1, 1)[0]
    elif which == "residual":
        r = huge(cout, 4)
        y = conv2d_fused(x, w, None, 1, 0, 1, 1, residual=r)[0]
        ref = ref + r.contiguous()
    else:
        y = conv2d_fused(x, w, None, 1, 0, 1, 1, out=huge(cout, 4))[0]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("which", ["x", "residual", "out"])
def test_conv_offsets_past_int32_within_a_sample(which):
    """In a subprocess: an int32 offset that wraps reads or writes far outside
    the tensor (a crash, not just a wrong number)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _HUGE, which], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@triton.jit
def _tile_offsets_kernel(out_ptr, tile, pid_c, hw_blocks, C, HW, sN, sC, sHW,
                         BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, c, c_mask, offs, mask, n_valid = tile_2d(tile, pid_c, hw_blocks, C, HW, sN, sC, sHW,
                                                BLOCK_C, BLOCK_HW)
    i = tl.arange(0, BLOCK_C)[:, None] * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    tl.store(out_ptr + i, offs, mask=mask)


def test_tile_offsets_past_int32():
    """tile_2d, which every BN / add / activation kernel addresses its tiles
    with, gives exact offsets where c * sC passes 2**31."""
    C, HW = 2 ** 20, 2 ** 12  # NCHW: sC = HW, one sample spans 2**32 elements
    bc, bhw = 4, 8
    pid_c, hw_block = C // bc - 1, 3  # the last channels of the sample
    got = torch.zeros(bc, bhw, dtype=torch.int64)
    _tile_offsets_kernel[(1,)](got, hw_block, pid_c, HW // bhw, C, HW, C * HW, HW, 1,
                               BLOCK_C=bc, BLOCK_HW=bhw)
    c = torch.arange(pid_c * bc, pid_c * bc + bc, dtype=torch.int64)[:, None]
    hw = torch.arange(hw_block * bhw, hw_block * bhw + bhw, dtype=torch.int64)[None, :]
    assert torch.equal(got, c * HW + hw)
