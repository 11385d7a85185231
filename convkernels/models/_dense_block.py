"""The DenseNet dense block and transition as single autograd nodes on the fused ops.

Dense block (memory-efficient, after Pleiss et al. 2017, "Memory-Efficient
Implementation of DenseNets"):

* One preallocated feature buffer ``buf`` of shape ``[N, C0 + L*k, H, W]`` in
  x's memory format. The block input is copied into ``buf[:, :C0]`` once and
  layer ``l`` writes its ``k`` new channels into ``buf[:, C0+l*k : C0+(l+1)*k]``
  (``bn_act_conv_out``); there is no ``torch.cat``. The block returns ``buf``.
* Training: the batch mean / variance of a channel is computed once, when the
  channel is produced (``batch_stats`` of the input, then of each layer's new
  channels), and every later layer's norm1 normalises with those statistics.
  Each norm1's running statistics are updated from them exactly as
  ``nn.BatchNorm2d`` would update them from its own batch statistics.
* norm1-relu1-conv1 is one ``bn_act_conv`` over the buffer prefix, and
  norm2-relu2-conv2 one ``bn_act_conv`` written into the buffer slice. The
  prefix is a channel slice of buf, not a dense tensor: the cpu kernels read
  it in place (no O(L^2) copying), other backends get a dense copy.
* cpu backend: norm1-relu1-conv1 runs over slices of the batch (forward and
  backward), so that its prefix-sized temporaries stay small (see
  _CHUNK_BYTES). Eval without autograd folds norm2 into conv1, with relu2 as
  oneDNN's post-op (see _eval_layer_cpu).
* The whole block is one ``torch.autograd.Function``. Saved for backward: the
  final buffer, the per-channel statistics, each layer's bottleneck (conv1
  output, ``bn_size*k`` channels; all layers' in one allocation) unless
  ``memory_efficient`` (then recomputed in backward), dropout masks (bool)
  when dropout is active, and the parameters. Nothing O(L^2) is stored.
* Backward walks the layers in reverse with a gradient buffer ``gB`` of buf's
  shape and per-channel accumulators ``gM``/``gV`` for the gradients reaching
  the shared statistics. Layer l first finalises the gradient of its own k
  channels (every consumer of them has run) by adding the batch-statistics
  backward, then backprops norm2/conv2 (training: norm2's batch statistics
  folded into the same apply pass) and norm1/conv1 with given statistics,
  adding into ``gB[:, :c]``, ``gM[:c]`` and ``gV[:c]``.

Transition: ``t = relu(bn(x))``, ``avg_pool2d(t, 2)``, then the 1x1 conv on the
4x smaller pooled tensor (pooling and a 1x1 conv commute). One autograd node
that saves x (the block buffer, saved anyway), the statistics and the pooled
tensor (a quarter of t's size); backward needs t neither for the conv (it has
the pooled tensor) nor for the pooling's backward (only its shape).

Autocast: the callers (fuse.densenet) cast x and the conv weights to the
autocast dtype, as autocast casts a convolution's arguments, and run these
functions with autocast off. The buffer, every conv and the saved tensors are
then in that dtype, while the BN parameters stay float32 and the statistics
in the accumulation dtype (float32), as torch's batch_norm keeps them.

torch.compile(fullgraph=True) traces the three autograd Functions, forward
and backward, with no graph break: their bodies use only ops with fake
implementations and control flow decided by shapes and the configs (nothing
that reads tensor data or storage addresses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import backend
from ..ops._conv import conv2d, conv2d_backward, cpu_conv_ok, cpu_conv_plan
from ..ops._fold import FOLD_CACHE, eval_scale_shift, folded_conv_params
from ..ops._library import DirectOps, memory_format, plain_eager, unpack_grads
from ..ops.primitives import acc_dtype, bn_input

_ONE = [1, 1]
_ZERO = [0, 0]
_ops = torch.ops.convkernels
# For the eval layers without autograd (batch 1: ~120 calls a forward, where the
# dispatcher's Python layers are a good part of each); training keeps the ops.
_direct = DirectOps()


@dataclass
class BNCfg:
    """What one BatchNorm contributes to a fused call (see nn._bn_state.bn_args)."""

    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    training: bool  # normalise with batch statistics
    momentum: float
    eps: float


@dataclass
class BlockCfg:
    c0: int
    growth_rate: int
    norm1: List[BNCfg]
    norm2: List[BNCfg]
    drop_rate: float  # 0 when dropout is inactive (eval, or drop_rate == 0)
    memory_efficient: bool
    impl: str

    @property
    def num_layers(self) -> int:
        return len(self.norm1)

    @property
    def shared_stats(self) -> bool:
        return any(b.training for b in self.norm1)


def _stats(bn: BNCfg, x: Tensor, count: int, impl: str, shared=None):
    """(mean, var) BN normalises x with; updates the running statistics when training."""
    acc = acc_dtype(x.dtype)
    if not bn.training:
        return bn.running_mean.to(acc, copy=True), bn.running_var.to(acc, copy=True)
    mean, var = shared if shared is not None else _ops.batch_stats(x, impl)
    if bn.running_mean is not None:
        _ops.update_running_stats(bn.running_mean, bn.running_var, mean, var, bn.momentum, count)
    return mean, var


def _dense(t: Tensor, fmt) -> Tensor:
    """A channel slice of the gradient buffer as a dense tensor (a copy of k
    channels unless it already is one), for the ops that take only dense ones."""
    return t.contiguous(memory_format=fmt)


def _bn_relu_conv(x, mean, var, w, b, eps, cw, padding, impl, out=None):
    if out is None:
        return _ops.bn_act_conv_forward(x, mean, var, w, b, eps, "relu", cw, None, _ONE, padding,
                                        _ONE, 1, impl)
    _ops.bn_act_conv_out(x, mean, var, w, b, eps, "relu", cw, None, _ONE, padding, _ONE, 1, impl,
                         out)
    return out


# cpu backend: norm1-relu1-conv1 runs on slices of the batch holding about
# this many bytes of the prefix, so that its per-call temporaries (the
# transformed prefix, and in backward its gradient and the conv's input
# gradient) are small: they come from the heap's free lists instead of fresh
# mmaps (glibc maps blocks over its threshold, 32 MiB at most, afresh at each
# call, and every page faults on first touch) and leave fewer holes in the
# heap. densenet121, batch 16, 2-core VM: peak RSS of a training step -25%,
# page faults per step -40%, step time -6% (in-process A/B, 5 rounds; within
# the VM's noise in busier periods).
# Exact: norm1 normalises with given statistics, so each sample's result
# depends only on that sample.
_CHUNK_BYTES = 4 << 20


def _batch_chunks(x: Tensor, impl: str) -> List[slice]:
    n = x.size(0)
    if impl != "cpu" or n <= 1:
        return [slice(0, n)]
    step = max(1, min(n, _CHUNK_BYTES // max(1, x[0].numel() * x.element_size())))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _bn_relu_conv1(prefix, mean, var, w, b, eps, cw, impl, out=None):
    """norm1-relu1-conv1 of one layer (1x1 conv), the batch in chunks
    (_batch_chunks); written into ``out`` when given."""
    chunks = _batch_chunks(prefix, impl)
    if len(chunks) == 1:
        return _bn_relu_conv(prefix, mean, var, w, b, eps, cw, _ZERO, impl, out)
    if out is None:
        n, _, h, wd = prefix.shape
        out = torch.empty((n, cw.size(0), h, wd), dtype=prefix.dtype, device=prefix.device,
                          memory_format=memory_format(prefix))
    for s in chunks:
        _bn_relu_conv(prefix[s], mean, var, w, b, eps, cw, _ZERO, impl, out=out[s])
    return out


def _dropout_noise(like: Tensor, p: float) -> Tensor:
    """The noise ``F.dropout`` multiplies by on CPU (same RNG draws, same layout,
    so a seed gives torchvision's masks; on CUDA torch uses a fused kernel with
    another RNG order: same distribution, other masks)."""
    if p >= 1:
        return torch.zeros_like(like)
    return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)


def _eval_layer_cpu(prefix, bn1, w1, b1, cw1, bn2, w2, b2, cw2, new):
    """One layer in eval without autograd on the cpu backend, where the conv has
    no input prologue (bn_act_conv materialises relu(norm1(prefix)) anyway):
    norm2 is folded into conv1 (cached folded weights) with relu2 as oneDNN's
    post-op, which saves the pass over the bottleneck that norm2-relu2 would
    take, then conv2 writes the layer's channels (the cpu backend's inference
    conv: the direct NHWC kernel straight into the buffer slice where it takes
    the conv, else oneDNN on a prepacked weight). Eagerly in fp32 the three
    calls run as prepared (_layer_plan)."""
    if plain_eager(prefix, new) and cpu_conv_ok(prefix, None, "relu"):
        sources = (w1, b1, bn1.running_mean, bn1.running_var, cw1, w2, b2, bn2.running_mean,
                   bn2.running_var, cw2)
        kind = ("dense-eval-layer", bn1.eps, bn2.eps, tuple(prefix.shape), prefix.stride(),
                tuple(new.shape), new.stride())
        FOLD_CACHE.get(sources, kind, lambda: _layer_plan(prefix, bn1, w1, b1, cw1, bn2, w2, b2,
                                                          cw2))(prefix, new)
        return
    t = _direct.bn_act_forward(prefix, w1, b1, None, bn1.running_mean, bn1.running_var, False,
                               bn1.eps, "relu", "cpu")[0]
    u = _direct.conv_bn_act_eval(t, cw1, None, bn2.running_mean, bn2.running_var, w2, b2, bn2.eps,
                                 _ONE, _ZERO, _ONE, 1, "relu", None, "cpu")
    del t
    _direct.conv_act_eval_out(u, cw2, None, _ONE, _ONE, _ONE, 1, "identity", None, "cpu", new)


def _layer_plan(prefix, bn1, w1, b1, cw1, bn2, w2, b2, cw2):
    """``run(prefix, new)``: _eval_layer_cpu's three calls as their op bodies
    compute them (eval's norm1 scale and shift, norm2 folded into conv1, the
    CPU conv plans), worked out once for inputs shaped as ``prefix`` and kept
    in the fold cache with the layer's tensors: at batch 1 the op bodies'
    per-call derivations were 117 us of a 517 us layer (DenseNet-121's
    denselayer5 of block 2, Intel Xeon VM, 2 threads)."""
    k, fmt = backend.kernels("cpu"), memory_format(prefix)
    scale, shift = eval_scale_shift(bn1.running_mean, bn1.running_var, w1, b1, bn1.eps,
                                    acc_dtype(prefix.dtype))
    t = k.bn_act_apply(bn_input(k, prefix, fmt), scale, shift, None, "relu")
    fw, fb = folded_conv_params(cw1, None, bn2.running_mean, bn2.running_var, w2, b2, bn2.eps)
    conv1 = cpu_conv_plan(t, fw, fb, _ONE, _ZERO, _ONE, 1, "relu", None)
    conv2 = cpu_conv_plan(conv1(t, None, None), cw2, None, _ONE, _ONE, _ONE, 1, "identity", None)

    def run(prefix, new):
        t = k.bn_act_apply(bn_input(k, prefix, fmt), scale, shift, None, "relu")
        u = conv1(t, None, None)
        del t
        conv2(u, None, new)
    return run


def block_forward(cfg: BlockCfg, x: Tensor, params, save: bool):
    """Runs the block (no autograd). Returns buf and, with ``save``, the list of
    tensors the backward needs (see block_backward for the layout)."""
    impl, k, c0, nl = cfg.impl, cfg.growth_rate, cfg.c0, cfg.num_layers
    n, _, h, w = x.shape
    count = n * h * w
    total = c0 + nl * k
    acc = acc_dtype(x.dtype)
    buf = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device,
                      memory_format=memory_format(x))
    buf[:, :c0].copy_(x)
    mean_all = var_all = None
    if cfg.shared_stats:
        # Statistics of every channel a later layer normalises (not the last layer's).
        mean_all = x.new_empty(total - k, dtype=acc)
        var_all = x.new_empty(total - k, dtype=acc)
        m, v = _ops.batch_stats(x, impl)
        mean_all[:c0].copy_(m)
        var_all[:c0].copy_(v)
    # The bottlenecks kept for backward (default mode), all layers' in one
    # allocation: kept apart from the per-layer temporaries, they leave no
    # holes in the heap that would keep its pages resident (-15% peak RSS of a
    # CPU training step), and they go back to the OS at once after backward.
    zs = None
    if save and not cfg.memory_efficient:
        zs = torch.empty((nl * n, params[2].size(0), h, w), dtype=x.dtype, device=x.device,
                         memory_format=memory_format(x))
    per_layer = []
    for l in range(nl):
        w1, b1, cw1, w2, b2, cw2 = params[6 * l: 6 * l + 6]
        bn1, bn2 = cfg.norm1[l], cfg.norm2[l]
        c = c0 + l * k
        prefix = buf[:, :c]
        if not save and impl == "cpu" and not (bn1.training or bn2.training or cfg.drop_rate):
            _eval_layer_cpu(prefix, bn1, w1, b1, cw1, bn2, w2, b2, cw2, buf[:, c:c + k])
            del prefix
            continue
        shared = (mean_all[:c], var_all[:c]) if bn1.training else None
        m1, v1 = _stats(bn1, prefix, count, impl, shared)
        z = _bn_relu_conv1(prefix, m1, v1, w1, b1, bn1.eps, cw1, impl,
                           None if zs is None else zs[l * n:(l + 1) * n])
        del prefix
        m2, v2 = _stats(bn2, z, count, impl)
        new = buf[:, c:c + k]
        mask = None
        if cfg.drop_rate > 0:
            raw = _bn_relu_conv(z, m2, v2, w2, b2, bn2.eps, cw2, _ONE, impl)
            noise = _dropout_noise(raw, cfg.drop_rate)
            new.copy_(raw.mul_(noise))
            del raw
            mask = (noise != 0, noise.amax() if noise.numel() else noise.new_zeros(()))
            del noise
        else:
            _bn_relu_conv(z, m2, v2, w2, b2, bn2.eps, cw2, _ONE, impl, out=new)
        if cfg.shared_stats and l < nl - 1:
            m, v = _ops.batch_stats(new, impl)
            mean_all[c:c + k].copy_(m)
            var_all[c:c + k].copy_(v)
        if save:
            per_layer.append((None if bn1.training else (m1, v1), m2, v2, mask))
        del z
    if not save:
        return buf, None
    return buf, (mean_all, var_all, zs, per_layer)


def _stats_backward(gm, gv, x, mean, impl):
    return _ops.batch_stats_backward(gm, gv, x, mean, impl)


def block_backward(cfg: BlockCfg, grad_buf: Tensor, buf: Tensor, mean_all, var_all, zs,
                   per_layer, params, needs):
    """Gradients of (x, *params); ``needs``: needs_input_grad of (x, *params)."""
    impl, k, c0, nl = cfg.impl, cfg.growth_rate, cfg.c0, cfg.num_layers
    g_buf = torch.empty_like(buf)
    g_buf.copy_(grad_buf)
    fmt = memory_format(buf)
    shared = cfg.shared_stats
    if shared:
        g_mean = torch.zeros_like(mean_all)
        g_var = torch.zeros_like(var_all)
    grads: list = [None] * (6 * nl)
    for l in reversed(range(nl)):
        w1, b1, cw1, w2, b2, cw2 = params[6 * l: 6 * l + 6]
        nw1, nb1, ncw1, nw2, nb2, ncw2 = needs[1 + 6 * l: 7 + 6 * l]
        bn1, bn2 = cfg.norm1[l], cfg.norm2[l]
        eval_stats1, m2, v2, mask = per_layer[l]
        c = c0 + l * k
        prefix = buf[:, :c]
        m1, v1 = (mean_all[:c], var_all[:c]) if eval_stats1 is None else eval_stats1
        # Every consumer of layer l's channels has run: finalise their gradient.
        g_new = _dense(g_buf[:, c:c + k], fmt)
        if shared and l < nl - 1:
            # In place: g_new is a copy, or (N == 1) a view of channels no one reads again.
            g_new = g_new.add_(_stats_backward(g_mean[c:c + k], g_var[c:c + k], buf[:, c:c + k],
                                               mean_all[c:c + k], impl))
        if mask is not None:
            keep, value = mask
            g_new = torch.where(keep, g_new * value, torch.zeros((), dtype=g_new.dtype,
                                                                   device=g_new.device))
        if zs is not None:
            z = zs[l * buf.size(0):(l + 1) * buf.size(0)]
        else:  # memory_efficient: recompute the bottleneck
            z = _bn_relu_conv1(prefix, m1, v1, w1, b1, bn1.eps, cw1, impl)
        # norm2 / relu2 / conv2; norm2's batch statistics are z's own (their
        # gradient folded into g_z's apply pass when training).
        mask2 = [True, False, False, w2 is not None and nw2, b2 is not None and nb2, ncw2, False]
        out2 = iter(_ops.bn_act_conv_backward(g_new, z, m2, v2, w2, b2, bn2.eps, "relu", cw2, _ONE,
                                              _ONE, _ONE, 1, False, bn2.training, mask2, impl))
        g_z = next(out2)
        grads[6 * l + 3] = next(out2) if mask2[3] else None
        grads[6 * l + 4] = next(out2) if mask2[4] else None
        grads[6 * l + 5] = next(out2) if mask2[5] else None
        del g_new
        # norm1 / relu1 / conv1 over the prefix, with given statistics.
        need_prefix = l > 0 or needs[0]  # layer 0's prefix is the block input
        need_stats = bn1.training and need_prefix
        mask1 = [need_prefix, need_stats, need_stats, w1 is not None and nw1,
                 b1 is not None and nb1, ncw1, False]
        # Chunks of the batch (_batch_chunks): with given statistics a sample's
        # input gradient is its own; the other gradients are sums over chunks.
        del z
        sums = [None] * 3
        for s in _batch_chunks(prefix, impl):
            out1 = iter(_ops.bn_act_conv_backward(g_z[s], prefix[s], m1, v1, w1, b1, bn1.eps,
                                                  "relu", cw1, _ONE, _ZERO, _ONE, 1, False, False,
                                                  mask1, impl))
            if mask1[0]:
                g_buf[s, :c].add_(next(out1))
            if mask1[1]:
                g_mean[:c].add_(next(out1))
                g_var[:c].add_(next(out1))
            for i in range(3):
                if mask1[3 + i]:
                    g = next(out1)
                    sums[i] = g if sums[i] is None else sums[i].add_(g)
        del g_z, prefix
        grads[6 * l: 6 * l + 3] = sums
    g_x = None
    if needs[0]:
        if shared:
            g_x = _dense(g_buf[:, :c0], fmt) + _stats_backward(
                g_mean[:c0], g_var[:c0], buf[:, :c0], mean_all[:c0], impl)
        else:
            # A copy even where the slice is already dense (N == 1): a view would
            # keep all of g_buf alive as long as the input's gradient.
            g_x = g_buf[:, :c0].clone(memory_format=fmt)
    del g_buf
    return g_x, grads


class DenseBlockFunction(torch.autograd.Function):
    """``buf = dense_block(x, *params)``; params are 6 per layer:
    norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight."""

    @staticmethod
    def forward(ctx, cfg: BlockCfg, x: Tensor, *params):
        buf, (mean_all, var_all, zs, per_layer) = block_forward(cfg, x, params, save=True)
        # Everything goes through save_for_backward (so saved-tensor hooks see it).
        flat, layout = [], []
        for eval_stats1, m2, v2, mask in per_layer:
            entry = []
            for t in ((eval_stats1 or (None, None)) + (m2, v2) + (mask or (None, None))):
                entry.append(len(flat) if t is not None else None)
                if t is not None:
                    flat.append(t)
            layout.append(entry)
        ctx.save_for_backward(buf, mean_all, var_all, zs, *params, *flat)
        ctx.cfg, ctx.layout, ctx.num_params = cfg, layout, len(params)
        return buf

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_buf):
        saved = ctx.saved_tensors
        buf, mean_all, var_all, zs = saved[:4]
        params = saved[4:4 + ctx.num_params]
        flat = saved[4 + ctx.num_params:]
        get = lambda i: None if i is None else flat[i]  # noqa: E731
        per_layer = []
        for e in ctx.layout:
            s1 = None if e[0] is None else (get(e[0]), get(e[1]))
            mask = None if e[4] is None else (get(e[4]), get(e[5]))
            per_layer.append((s1, get(e[2]), get(e[3]), mask))
        g_x, grads = block_backward(ctx.cfg, grad_buf, buf, mean_all, var_all, zs, per_layer,
                                    params, ctx.needs_input_grad[1:])
        return (None, g_x, *grads)


# ------------------------------------------------------------------ transition
@dataclass
class TransitionCfg:
    bn: BNCfg
    impl: str


def transition_forward(cfg: TransitionCfg, x, w, b, cw):
    """conv1x1(avg_pool2d(relu(bn(x)), 2)); returns (y, mean, var, pooled)."""
    bn = cfg.bn
    t, mean, var = _ops.bn_act_forward(x, w, b, None, bn.running_mean, bn.running_var,
                                       bn.training, bn.eps, "relu", cfg.impl)
    if bn.training and bn.running_mean is not None:
        _ops.update_running_stats(bn.running_mean, bn.running_var, mean, var, bn.momentum,
                                  x.numel() // x.size(1))
    p = F.avg_pool2d(t, 2, 2)
    del t
    y = conv2d(p, cw, None, _ONE, _ZERO, _ONE, 1)
    return y, mean, var, p


class TransitionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: TransitionCfg, x, w, b, cw):
        y, mean, var, p = transition_forward(cfg, x, w, b, cw)
        ctx.save_for_backward(x, w, b, cw, mean, var, p)
        ctx.cfg = cfg
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w, b, cw, mean, var, p = ctx.saved_tensors
        cfg = ctx.cfg
        _, need_x, need_w, need_b, need_cw = ctx.needs_input_grad
        g_p, g_cw, _ = conv2d_backward(grad_y, p, cw, False, _ONE, _ZERO, _ONE, 1,
                                       [True, need_cw, False])
        del p
        if x.size(2) % 2 == 0 and x.size(3) % 2 == 0:
            # Each pixel lies in exactly one 2x2 window: its gradient is the
            # window's g_p / 4, an exact nearest upsampling (one write pass,
            # where aten's avg_pool2d_backward zero-fills, then scatters).
            g_t = F.interpolate(g_p.mul_(0.25), scale_factor=2, mode="nearest")
        else:
            # The pooling's backward reads only its input's shape (and layout): x's.
            g_t = torch.ops.aten.avg_pool2d_backward(g_p, x, [2, 2], [2, 2], [0, 0], False, True,
                                                     None)
        del g_p
        mask = [need_x, w is not None and need_w, b is not None and need_b, False]
        g_x, g_w, g_b, _ = unpack_grads(_ops.bn_act_backward(
            g_t, x, w, b, None, mean, var, cfg.bn.training, cfg.bn.eps, "relu", mask, cfg.impl),
            mask)
        return None, g_x, g_w, g_b, g_cw if need_cw else None


# ------------------------------------------------------------------------ stem
def _pair(v) -> list:
    return [v, v] if isinstance(v, int) else list(v)


@dataclass
class StemCfg:
    """conv0 (no bias) + norm0 + relu0 + max-pool0."""

    bn: BNCfg
    stride: list
    padding: list
    dilation: list
    groups: int
    pool: tuple  # (kernel_size, stride, padding, dilation, ceil_mode), pairs as lists
    impl: str


class StemFunction(torch.autograd.Function):
    """``max_pool2d(relu(bn(conv2d(x))))`` saving only x and the conv output z
    (and O(C) statistics): backward recomputes the activation and the pooling
    indices from z instead of keeping them."""

    @staticmethod
    def forward(ctx, cfg: StemCfg, x, cw, w, b):
        bn = cfg.bn
        y, z, mean, var = _ops.conv_bn_act_forward(
            x, cw, None, w, b, bn.running_mean, bn.running_var, bn.training, bn.eps, cfg.stride,
            cfg.padding, cfg.dilation, cfg.groups, "relu", None, cfg.impl)
        if bn.training and bn.running_mean is not None:
            _ops.update_running_stats(bn.running_mean, bn.running_var, mean, var, bn.momentum,
                                      z.numel() // z.size(1))
        out = torch.ops.aten.max_pool2d(y, *cfg.pool)
        ctx.save_for_backward(x, cw, z, w, b, mean, var)
        ctx.cfg = cfg
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, cw, z, w, b, mean, var = ctx.saved_tensors
        cfg = ctx.cfg
        _, need_x, need_cw, need_w, need_b = ctx.needs_input_grad
        # The forward's y, bit for bit (same scale/shift), hence the same argmax.
        y, _, _ = _ops.bn_act_forward(z, w, b, None, mean, var, False, cfg.bn.eps, "relu",
                                      cfg.impl)
        _, idx = torch.ops.aten.max_pool2d_with_indices(y, *cfg.pool)
        g_y = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, y, *cfg.pool, idx)
        del y, idx
        mask = [need_x, need_cw, False, w is not None and need_w, b is not None and need_b, False]
        g_x, g_cw, _, g_w, g_b, _ = unpack_grads(_ops.conv_bn_act_backward(
            g_y, x, cw, z, w, b, None, mean, var, cfg.bn.training, cfg.bn.eps, cfg.stride,
            cfg.padding, cfg.dilation, cfg.groups, "relu", False, mask, cfg.impl), mask)
        return None, g_x, g_cw, g_w, g_b
