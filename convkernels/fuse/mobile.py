"""torchvision's mobile-style blocks: ``Conv2dNormActivation`` (and RegNet's
``SimpleStemIN``), EfficientNet's ``MBConv`` / ``FusedMBConv`` and RegNet's
``ResBottleneckBlock``.

* ``Conv2dNormActivation`` is an ``nn.Sequential`` subclass whose forward is
  Sequential's, so the Sequential family's forward is its forward: conv -> BN
  -> act as one ``conv_bn_act`` where act is one the ops compute (ReLU, SiLU,
  Sigmoid, Identity); any other act (Hardswish, ...) runs as itself after a
  fused conv -> BN.
* ``SqueezeExcitation`` (pool -> fc1 -> act -> fc2 -> gate, times the input):
  in CPU inference (no autograd, fp32/fp64, plain eager) one
  ``squeeze_excite`` call (``csrc/cpu/squeeze_excite_cpu.cpp``); anywhere else,
  and whenever a child is observed or not exactly AdaptiveAvgPool2d(1), plain
  1x1 Conv2d, ReLU/SiLU and Sigmoid (MobileNetV3's Hardsigmoid), torchvision's
  forward. EfficientNet-B0 eval at batch 1 (Intel Xeon VM, 2 threads): the 16
  blocks took 2.9 ms of a 14.1 ms forward as torchvision's forward.
* ``MBConv`` / ``FusedMBConv`` in CPU eval without autograd, where every
  child would run fused (conv -> BN -> act parts, squeeze_excite) and nothing
  in the block is observed: one block chain (fuse/_prepared.py), the parts'
  kept plans and the SE kernel checked once a call (EfficientNet-B0 eval on
  the Intel Xeon VM, alternating processes: b1 11.02 -> 10.37 ms, b8 65.3 ->
  60.8 ms). Otherwise, with a residual: the blocks before the project
  conv are called as modules (they fuse themselves), then the project's conv
  -> BN and the join. In eval (or with a drop probability of 0) the shortcut is
  the project's ``conv_bn_act`` residual; in training the project runs as
  ``conv_bn_act`` and StochasticDepth's mask and the add are one ``add_act``
  with the mask as its per-sample scale, the mask drawn exactly as
  torchvision's ``stochastic_depth`` draws it (same shape, dtype, device, and
  at the same point: after the branch), so a seed gives torchvision's mask.
* ``ResBottleneckBlock``: ``proj(x)`` (a fused module) or ``x`` is the residual
  of ``f.c``'s ``conv_bn_act``, with the block's activation as its act.
* ``EfficientNet`` / ``RegNet``: torchvision's own forward, on the input made
  channels_last on CPU when the stem (``features[0]`` / ``stem``) runs fused
  (``fuse.layout``; 2-core EPYC, same-run ratios to torchvision before -> after:
  efficientnet_b0 eval batch 8 1.26x -> 1.50x, train batch 16 0.97x -> 1.35x;
  regnet_y_400mf eval batch 8 0.81x -> 1.83x). Every module call is
  torchvision's, so hooks and tracers see what they see there; a hook on the
  stem, or on ``features`` before it, keeps the caller's layout.

A block runs its own ``block``/``f`` Sequential's children here, not through
the Sequential, so when that Sequential, its last child or StochasticDepth is
observable (hooks, a forward set on the instance, another class), or the
input is not one the ops take, the block runs torchvision's forward, whose
children still fuse themselves. Nothing here imports torchvision.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from .. import backend, ops
from ..ops._conv import cpu_conv_ok
from ..ops._library import needs_grad, plain_eager
from . import _prepared
from ._guard import (ACTS, _module_blocker, act_blocker, context_blocker, conv_blocker,
                     input_blocker, observed, part_blocker)
from ._parts import chain_step, conv_bn_act
from ._registry import Family, Pattern, family_of, register
from .layout import cpu_trunk_layout
from .sequential import _patterns as sequential_patterns
from .sequential import sequential_forward

_MISC = "torchvision.ops.misc."
_SD = "torchvision.ops.stochastic_depth.StochasticDepth"
_EFF = "torchvision.models.efficientnet."
_REGNET = "torchvision.models.regnet."


def _is(m: nn.Module, path: str) -> bool:
    """``m``'s class is exactly the class at ``path`` (a subclass, or a
    parametrized module's swapped class, may compute something else)."""
    cls = type(m)
    return (f"{cls.__module__}.{cls.__qualname__}" == path
            and getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is cls)


def _conv_bn(m: nn.Module) -> Optional[list]:
    """``[conv, bn]`` of a ``Conv2dNormActivation`` without an activation (its
    forward, Sequential's, is then conv then bn)."""
    if not _is(m, _MISC + "Conv2dNormActivation"):
        return None
    mods = list(m._modules.values())
    if len(mods) != 2 or type(mods[0]) is not nn.Conv2d or type(mods[1]) is not nn.BatchNorm2d:
        return None
    return mods


def _join_pattern(seq: nn.Module, prefix: str, act, residual: bool = True) -> list:
    """The join part, for the report: ``seq``'s last child's conv -> BN with the
    shortcut as residual (or, ``residual=False``, without one)."""
    if not len(seq._modules):
        return []
    name, last = list(seq._modules.items())[-1]
    conv_bn = _conv_bn(last)
    if conv_bn is None:
        return []  # e.g. FusedMBConv without expansion: its one layer has an act
    return [Pattern((f"{prefix}.{name}.0", conv_bn[0]), (f"{prefix}.{name}.1", conv_bn[1]), act,
                    residual=residual)]


def _split(seq: nn.Module, x) -> Optional[tuple]:
    """``(head, conv, bn)``: the children of ``seq`` before its last and the last
    one's conv and BN, when ``seq`` may be run child by child here."""
    if observed(seq) or not len(seq._modules) or input_blocker(x, None) is not None:
        return None
    *head, last = seq._modules.values()
    conv_bn = _conv_bn(last)
    return None if conv_bn is None or observed(last) else (head, *conv_bn)


def _run(mods: list, x: Tensor) -> Tensor:
    for m in mods:
        x = m(x)
    return x


# ---------------------------------------------------------------- EfficientNet
def _sd_blocker(sd: nn.Module) -> Optional[str]:
    """StochasticDepth as the fused join computes it: row mode, a valid p
    (torchvision raises otherwise, and so must its forward here)."""
    if not _is(sd, _SD) or observed(sd):
        return "stochastic_depth is observed or replaced"
    if sd.mode != "row" or not 0.0 <= sd.p <= 1.0:
        return f"stochastic_depth mode={sd.mode!r} p={sd.p}"
    return None


def _drop_add(y: Tensor, residual: Tensor, p: float) -> Tensor:
    """``stochastic_depth(y, p, "row") + residual`` in training: the mask drawn
    as torchvision draws it, then one ``add_act`` with it as the scale."""
    survival_rate = 1.0 - p
    noise = torch.empty([y.shape[0]] + [1] * (y.ndim - 1), dtype=y.dtype, device=y.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    if input_blocker(y, None, residual) is None and residual.dtype == y.dtype:
        return ops.add_act(y, residual, "identity", noise.view(-1))
    y = y * noise
    y += residual
    return y


def _chain_stages(seq: nn.Module) -> Optional[list]:
    """The children of an MBConv's ``block`` as chain stages: ("conv", conv, bn,
    act) for a Conv2dNormActivation of conv -> BN [-> an act the ops compute],
    ("se", se) for a SqueezeExcitation the kernel computes; None for anything
    else, or anything observed."""
    stages = []
    for child in seq._modules.values():
        if observed(child):
            return None
        if family_of(child) is _CNA:
            mods = list(child._modules.values())
            if len(mods) == 3 and act_blocker(mods[2]) is None:
                stages.append(("conv", mods[0], mods[1], ACTS[type(mods[2])]))
            elif len(mods) == 2:
                stages.append(("conv", mods[0], mods[1], "identity"))
            else:
                return None
        elif _is(child, _MISC + "SqueezeExcitation") and se_blocker(child) is None:
            stages.append(("se", child))
        else:
            return None
    return stages if stages and stages[-1][0] == "conv" else None


def _prepared_mbconv(block: nn.Module, x: Tensor) -> Optional[Tensor]:
    """MBConv's eval forward on CPU as one block chain (fuse/_prepared.py), or
    None where it runs as below: its convs' plans and squeeze_excite calls, the
    input the project conv's residual (stochastic depth is the identity in
    eval). The project conv must have no act where the input is added after it."""
    seq, res = block.block, block.use_res_connect
    # The context (tracers) first: FX records every parameter or buffer read.
    if context_blocker() is not None or type(seq) is not nn.Sequential or observed(seq):
        return None
    sd = block.stochastic_depth
    if res and (_sd_blocker(sd) is not None or (sd.training and sd.p > 0.0)):
        return None
    stages = _chain_stages(seq)
    if stages is None or (res and stages[-1][3] != "identity"):
        return None
    pairs = [(st[1], st[2]) for st in stages if st[0] == "conv"]
    if (_prepared.pairs_blocker(pairs) or input_blocker(x, pairs[0][0].weight)) is not None:
        return None
    ses = [st[1] for st in stages if st[0] == "se"]
    sources = _prepared.conv_bn_sources(pairs) + tuple(
        t for se in ses for t in (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias))
    if not (_prepared.may_prepare(x, None, sources) and cpu_conv_ok(x, x, "identity")):
        return None
    key = (res, _prepared.meta_of(x), tuple(
        (st[3], st[1].stride, st[1].padding, st[1].dilation, st[1].groups, st[2].eps)
        if st[0] == "conv" else (type(st[1].activation), type(st[1].scale_activation))
        for st in stages))

    def build(x):
        """This call child by child, as their own forwards run it; the chain
        only where each conv kept a plan and each SE took its kernel."""
        steps, plans, out, whole = [], [], x, True
        for i, st in enumerate(stages):
            if st[0] == "se":
                whole = whole and _se_input_ok(st[1], out)
                out, step = squeeze_excitation_forward(st[1], out), _se_step(st[1])
            else:
                residual = x if res and i == len(stages) - 1 else None
                out = chain_step(out, st[1], st[2], st[3], residual, plans)
                step = plans[-1]
            steps.append((st[0] == "se", step))
        return out, _mbconv_chain(steps, res) if whole and None not in plans else None
    return _prepared.run_chain(block, x, sources, key, build)


def _se_step(se: nn.Module):
    """``run(x)``: the block's squeeze_excite call, on its parameters as they
    are when it runs."""
    fc1, fc2 = se.fc1, se.fc2
    act, gate = _SE_ACTS[type(se.activation)], _SE_GATES[type(se.scale_activation)]
    return lambda t: torch.ops.convkernels_C.squeeze_excite(
        t, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, gate)


def _mbconv_chain(steps: list, res: bool):
    *head, (_, last) = steps

    def run(x):
        out = x
        for is_se, step in head:
            out = step(out) if is_se else _prepared.run_plan(step, out)
        return _prepared.run_plan(last, out, x if res else None)
    return run


def mbconv_forward(block: nn.Module, input: Tensor) -> Tensor:
    """MBConv's and FusedMBConv's forward (the same in torchvision)."""
    y = _prepared_mbconv(block, input)
    if y is not None:
        return y
    sd = block.stochastic_depth
    split = None
    if block.use_res_connect and type(block.block) is nn.Sequential and _sd_blocker(sd) is None:
        split = _split(block.block, input)
    if split is None or part_blocker(split[1], split[2], None) is not None:
        return type(block).forward(block, input)
    head, conv, bn = split
    out = _run(head, input)
    if not sd.training or sd.p == 0.0:
        return conv_bn_act(out, conv, bn, None, input)
    return _drop_add(conv_bn_act(out, conv, bn, None), input, sd.p)


def _mbconv_patterns(block: nn.Module) -> list:
    """The project conv -> BN (with the input as residual where the block adds
    it); a block without the residual is bound too, for its eval chain."""
    if type(block.block) is not nn.Sequential:
        return []
    return _join_pattern(block.block, "block", None, residual=block.use_res_connect)


# ---------------------------------------------------------- SqueezeExcitation
_SE_ACTS = {nn.ReLU: "relu", nn.SiLU: "silu"}
_SE_GATES = {nn.Sigmoid: "sigmoid"}


def _se_fc_blocker(conv: nn.Module) -> Optional[str]:
    reason = conv_blocker(conv)
    if reason is None and (conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                           conv.groups) != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
        reason = "is not a plain 1x1 conv"
    return reason


def _se_act_blocker(m: nn.Module, kinds: dict) -> Optional[str]:
    if type(m) not in kinds:
        return f"is {type(m).__name__}, not {' or '.join(c.__name__ for c in kinds)}"
    return _module_blocker(m)


def _prefixed(name: str, reason: Optional[str]) -> Optional[str]:
    return None if reason is None else f"{name} {reason}"


def se_blocker(se: nn.Module) -> Optional[str]:
    """Everything but the input: the block's children as squeeze_excite computes them."""
    if "_scale" in se.__dict__:
        return "its _scale is overridden on the instance"
    pool = se.avgpool
    if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
        return "avgpool is not AdaptiveAvgPool2d(1)"
    return (context_blocker() or _prefixed("avgpool", _module_blocker(pool))
            or _prefixed("fc1", _se_fc_blocker(se.fc1))
            or _prefixed("fc2", _se_fc_blocker(se.fc2))
            or _prefixed("activation", _se_act_blocker(se.activation, _SE_ACTS))
            or _prefixed("scale_activation", _se_act_blocker(se.scale_activation, _SE_GATES)))


def _se_input_ok(se: nn.Module, x: Tensor) -> bool:
    """Whether squeeze_excite takes this call's input (the block's structure
    aside: se_blocker): CPU inference, plain eager, shapes torchvision's
    forward would accept. The plain-tensor check first: nothing may look at a proxy."""
    fc1, fc2 = se.fc1, se.fc2
    return (input_blocker(x, fc1.weight) is None
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.size(1) == fc1.in_channels == fc2.out_channels
            and fc1.out_channels == fc2.in_channels and x.size(2) * x.size(3) > 0
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and not needs_grad(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
            and not torch.is_autocast_enabled("cpu")
            and plain_eager(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
            and backend.resolve(x.device) == "cpu")


def squeeze_excitation_forward(se: nn.Module, x: Tensor) -> Tensor:
    """torchvision's ``scale_activation(fc2(activation(fc1(avgpool(x))))) * x``,
    as one squeeze_excite call in CPU inference (module docstring)."""
    # The context (tracers, in se_blocker) before the input.
    if se_blocker(se) is None and _se_input_ok(se, x):
        return _se_step(se)(x)
    return type(se).forward(se, x)


def _se_patterns(se: nn.Module) -> list:
    """Two parts, so that the report covers both convs: fc1 -> act, fc2 -> gate;
    none (nothing to bind) for activations the op never computes (MobileNetV3's
    Hardsigmoid gate)."""
    if type(se.activation) not in _SE_ACTS or type(se.scale_activation) not in _SE_GATES:
        return []
    check = lambda _act: se_blocker(se)  # noqa: E731  (the whole block's structure)
    return [Pattern(("fc1", se.fc1), None, ("activation", se.activation),
                    op="squeeze_excite (CPU inference)", act_blocker=check),
            Pattern(("fc2", se.fc2), None, ("scale_activation", se.scale_activation),
                    op="squeeze_excite (CPU inference)", act_blocker=check)]


# ---------------------------------------------------------------------- RegNet
def res_bottleneck_forward(block: nn.Module, x: Tensor) -> Tensor:
    """``activation(proj(x) + f(x))`` (or ``x + f(x)``): proj first, as
    torchvision computes it, then ``f``'s children, the last one's conv -> BN
    with the shortcut and the activation as one ``conv_bn_act``."""
    split = _split(block.f, x) if _is(block.f, _REGNET + "BottleneckTransform") else None
    if split is None or part_blocker(split[1], split[2], block.activation) is not None:
        return type(block).forward(block, x)
    head, conv, bn = split
    shortcut = x if block.proj is None else block.proj(x)
    return conv_bn_act(_run(head, x), conv, bn, block.activation, shortcut)


def _res_bottleneck_patterns(block: nn.Module) -> list:
    if not _is(block.f, _REGNET + "BottleneckTransform"):
        return []
    return _join_pattern(block.f, "f", ("activation", block.activation))


# ------------------------------------------------------------ the top levels
def _trunk_input(x, stem: Optional[nn.Module], *outer: nn.Module):
    """``x`` channels_last on CPU (``fuse.layout``) when ``stem``, a
    Conv2dNormActivation or SimpleStemIN, is conv -> BN -> act and runs that
    fused. ``outer``: the modules x passes on its way to the stem; they and the
    stem must be unobserved, as a hook on them would get the converted x."""
    if family_of(stem) is not _CNA or any(observed(m) for m in (stem, *outer)):
        return x
    mods = list(stem._modules.values())
    return cpu_trunk_layout(x, *mods) if len(mods) == 3 else x


def efficientnet_forward(model: nn.Module, x: Tensor) -> Tensor:
    """torchvision's forward on the input of the stem ``features[0]``."""
    stem = next(iter(model.features._modules.values()), None)
    return type(model).forward(model, _trunk_input(x, stem, model.features))


def regnet_forward(model: nn.Module, x: Tensor) -> Tensor:
    """torchvision's forward on the input of the stem ``stem``."""
    return type(model).forward(model, _trunk_input(x, model.stem))


def _stem_patterns(model: nn.Module, name: str) -> list:
    """The stem's conv -> BN -> act, named from the top level: the part the
    layout follows (the stem's own forward computes it)."""
    try:
        stem = model.get_submodule(name)
    except AttributeError:  # e.g. features replaced by a module without children
        return []
    if family_of(stem) is not _CNA or len(stem._modules) != 3:
        return []
    return [Pattern(*((f"{name}.{n}", m) for n, m in stem._modules.items()))]


def _efficientnet_patterns(model: nn.Module) -> list:
    return _stem_patterns(model, "features.0")


def _regnet_patterns(model: nn.Module) -> list:
    return _stem_patterns(model, "stem")


_CNA = Family("mobile.Conv2dNormActivation", sequential_forward, sequential_patterns)
register(_MISC + "Conv2dNormActivation", _CNA)
register(_REGNET + "SimpleStemIN", _CNA)
register(_MISC + "SqueezeExcitation",
         Family("mobile.SqueezeExcitation", squeeze_excitation_forward, _se_patterns))
_MBCONV = Family("mobile.MBConv", mbconv_forward, _mbconv_patterns)
register(_EFF + "MBConv", _MBCONV)
register(_EFF + "FusedMBConv", _MBCONV)
register(_REGNET + "ResBottleneckBlock",
         Family("mobile.ResBottleneckBlock", res_bottleneck_forward, _res_bottleneck_patterns))
register(_EFF + "EfficientNet",
         Family("mobile.EfficientNet", efficientnet_forward, _efficientnet_patterns))
register(_REGNET + "RegNet", Family("mobile.RegNet", regnet_forward, _regnet_patterns))
