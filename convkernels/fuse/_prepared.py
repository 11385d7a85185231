"""Prepared CPU inference calls of the conv parts: the per-call Python of a
fused ``conv [-> BN] [-> act]`` worked out once.

In eval without autograd on CPU (fp32, plain eager), everything a fused conv
part derives from its modules and its input's shape — the BN folded into the
weight, the weight prepacked for oneDNN, the checked arguments, the choice of
oneDNN or GEMM (``ops._conv.cpu_conv_plan``) — depends only on:

* the source tensors (conv weight and bias, BN weight, bias and running
  statistics): the same objects, at the same version counter and storage
  (``optimizer.step()``, ``load_state_dict`` and in-place writes bump the
  counter; a write through ``.data`` does not, ``convkernels.clear_caches()``
  covers it);
* the configuration: the BN module, the activation, the conv's stride,
  padding, dilation and groups, the BN's eps;
* the input's and the residual's shape, strides, dtype and device.

The first call runs the public op (its checks included, so a bad module gets
the op's error) and keeps the plan, keyed by the conv module; a later call with
all of the above unchanged runs the plan directly. Measured on a 1x16x8x8 3x3
conv (1 thread, quiet 2-core EPYC): 74 us a part call against 119 us through
the op, of which the oneDNN call and relu pass are 31 us; the rest is the
guard's and these checks' Python, which at batch 1 is still a good part of a
small conv's time. A hit is checked first and against the ids of the sources
the plan keeps, so a hit skips the checks made when it was kept: 30.3 -> 27.5
us a part (50 1x1 Conv2dNormActivations, 16 channels, 4x4, 1 thread, Intel
Xeon VM). Any change prepares again. Whether the call is one the plan may
take at all (grad mode, autocast, backend, tracing) is decided on every call.
Sources that are inference tensors (a model built under inference mode) have
no version counter: their calls are never kept.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from .. import backend
from ..ops._conv import cpu_conv_ok, cpu_conv_plan
from ..ops._fold import on_clear
from ..ops._library import dense, memory_format, needs_grad, plain_eager
from ._guard import bn_blocker, conv_blocker

_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
on_clear(_PLANS.clear)


def state_of(sources) -> Optional[tuple]:
    """The sources' version counters and storages; None for inference tensors."""
    try:
        return tuple(None if t is None else (t._version, t.data_ptr()) for t in sources)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def meta_of(t: Optional[Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def may_prepare(x: Tensor, residual: Optional[Tensor], sources) -> bool:
    """Whether this call may take a prepared plan at all (checked on every call):
    no autograd, no autocast, plain eager tensors, the cpu backend."""
    return not (needs_grad(x, residual, *sources) or torch.is_autocast_enabled("cpu")
                or not plain_eager(x, residual) or backend.resolve(x.device) != "cpu")


def _sources(conv: nn.Module, bn: Optional[nn.Module]) -> tuple:
    # The modules' dicts, not their attributes: the caller's guard admitted the
    # exact Conv2d and BatchNorm2d classes, whose tensors live there, and
    # nn.Module's __getattr__ took 3.2 of the hit's ~9 us (1 thread, Intel VM).
    p = conv._parameters
    if bn is None:
        return p["weight"], p["bias"]
    q, b = bn._parameters, bn._buffers
    return p["weight"], p["bias"], q["weight"], q["bias"], b["running_mean"], b["running_var"]


def _key(x, conv, bn, act, residual) -> tuple:
    return (bn, act, conv.stride, conv.padding, conv.dilation, conv.groups,
            None if bn is None else bn.eps, meta_of(x), meta_of(residual))


def run(x: Tensor, conv: nn.Module, bn: Optional[nn.Module], act: str,
        residual: Optional[Tensor], weights, op):
    """``act(bn(conv(x)) [+ residual])`` (``bn=None``: no BatchNorm), eval
    mode. ``weights()``: the op body's (weight, bias) for the conv (BN folded
    in); ``op()``: the public op's call, run on a miss. Returns the result, or
    None where a plan may not be used (the caller runs the op as usual)."""
    sources = _sources(conv, bn)
    if not may_prepare(x, residual, sources):
        return None
    key = _key(x, conv, bn, act, residual)
    ids = tuple(map(id, sources))  # a kept plan holds its sources: their ids stay theirs
    hit = _PLANS.get(conv)
    # A hit: the same, unchanged source objects and key. The sources were plain
    # tensors, and x's dtype and device ones cpu_conv_plan takes, when it was made.
    if hit is not None and hit[0] == key and hit[1] == ids and hit[2] == state_of(sources):
        fmt = memory_format(x)
        return hit[4](dense(x, fmt), dense(residual, fmt), None)
    if not (plain_eager(*sources) and cpu_conv_ok(x, residual, act)):
        return None
    state = state_of(sources)
    y = op()  # checks the arguments; computes what the plan below computes
    if state is not None:
        fmt = memory_format(x)
        with torch.inference_mode(False):  # the plan's tensors serve calls outside it too
            w, b = weights()
            plan = cpu_conv_plan(dense(x, fmt), w, b, conv.stride, conv.padding, conv.dilation,
                                 conv.groups, act, dense(residual, fmt))
        _PLANS[conv] = (key, ids, state, sources, plan)
    return y


# ------------------------------------------------------------ block chains
# A block whose parts would all run prepared may run as one kept chain of
# calls instead (fuse/resnet.py, fuse/mobile.py): checked once a call against
# all of the block's tensors and the input, not part by part. At batch 1 the
# Python between kernels runs cold (the kernels evict its caches): ~95 us a
# part in ResNet-50's forward against ~30 us measured alone.
_CHAINS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
on_clear(_CHAINS.clear)


def conv_bn_sources(pairs) -> tuple:
    """The tensors of (conv, bn) pairs whose guard admitted them."""
    return tuple(t for conv, bn in pairs for t in _sources(conv, bn))


def pairs_blocker(pairs) -> Optional[str]:
    """(conv, bn) pairs as a chain computes them: exact classes, unobserved, BN
    on its running statistics."""
    for conv, bn in pairs:
        reason = conv_blocker(conv) or bn_blocker(bn)
        if reason is None and (bn.training or bn.running_mean is None):
            reason = "BatchNorm uses batch statistics"
        if reason is not None:
            return reason
    return None


def run_chain(block: nn.Module, x: Tensor, sources: tuple, key: tuple, build):
    """``block``'s kept chain on x where it holds for these sources (same
    objects, versions, storages) and key; else ``build(x) -> (y, chain)``
    computes this call part by part (the parts' own calls: ops and checks on
    a miss, in the caller's inference mode) and the chain of the plans they
    kept is kept (none where a part kept none, or a source is an inference
    tensor)."""
    ids = tuple(map(id, sources))
    hit = _CHAINS.get(block)
    if hit is not None and hit[0] == key and hit[1] == ids and hit[2] == state_of(sources):
        return hit[4](x)
    state = state_of(sources)
    y, chain = build(x)
    if state is not None and chain is not None:
        _CHAINS[block] = (key, ids, state, sources, chain)
    return y


def kept_plan(x: Tensor, conv: nn.Module, bn: nn.Module, act: str, residual: Optional[Tensor]):
    """The plan kept for this conv part's call (as :func:`run` would take it
    now), or None."""
    hit, sources = _PLANS.get(conv), _sources(conv, bn)
    if (hit is not None and hit[0] == _key(x, conv, bn, act, residual)
            and hit[1] == tuple(map(id, sources)) and hit[2] == state_of(sources)):
        return hit[4]
    return None


def run_plan(plan, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """A kept plan on x (and residual) made dense in x's layout, as the ops do."""
    fmt = memory_format(x)
    return plan(dense(x, fmt), dense(residual, fmt), None)

