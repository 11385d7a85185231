"""torchvision's ResNet family (ResNet, ResNeXt, Wide ResNet): BasicBlock,
Bottleneck and the stem.

Each block's forward is torchvision's with its parts fused: conv -> BN -> ReLU
as one ``conv_bn_act``, and the last conv's BN, the shortcut add and the final
ReLU as one more with the shortcut as the epilogue's residual. The downsample
``Sequential(conv1x1, BN)`` is not the block's business: it is called as a
module, and the Sequential family fuses it (act ``identity``), so a hook on it
or inside it affects only it. The stem (conv1, bn1, relu) lives directly on the
``ResNet``, so fusing it means binding the top-level forward; everything else
there is called as torchvision calls it.

Stochastic depth (Huang et al. 2016; ``optimize(model, stochastic_depth_prob=p)``):
block l of L (every BasicBlock and Bottleneck in module order, l = 1..L) keeps
``p * l / L`` in its ``__dict__`` (a float: it pickles and deep-copies with the
block and is no state-dict key). In training each sample's residual branch is
dropped with that probability and the survivors scaled by 1/(1 - p_l); eval is
the identity. The mask is drawn (torch's default generator, ``bernoulli_`` as
torchvision's ``StochasticDepth``) at the start of the block's forward, before
anything else there, so fused and unfused paths draw the same masks; the fused
join is then the branch's ``conv_bn_act`` (act identity) and ``add_act`` with
the mask as its per-sample scale, the unfused one multiplies bn's output by it
before the add. It is this family's forward: ``unoptimize`` (or a block this
family does not bind) runs torchvision's block, without it.

Nothing here imports torchvision: the classes are registered by path.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._conv import cpu_conv_ok
from . import _prepared
from ._bind import bound
from ._guard import ACTS, act_blocker, context_blocker, input_blocker, observed, part_blocker
from ._parts import chain_step, conv_bn_act
from ._registry import Family, Pattern, family_of, register
from .layout import cpu_trunk_layout

# The block attribute holding p_l (absent: 0).
SD_ATTR = "stochastic_depth_prob"


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    return x if block.downsample is None else block.downsample(x)


def drop_scale(block: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The block's per-sample branch scale for this call: 0 (dropped) or
    1/(1 - p_l) (kept), drawn as torchvision's ``StochasticDepth`` draws it;
    None in eval or without stochastic depth."""
    p = block.__dict__.get(SD_ATTR, 0.0)
    if not block.training or p == 0.0:
        return None
    survival = 1.0 - p
    scale = torch.empty(x.size(0), dtype=x.dtype, device=x.device).bernoulli_(survival)
    return scale.div_(survival) if survival > 0.0 else scale


def _join(block: nn.Module, x: Tensor, out: Tensor, conv: nn.Module, bn: nn.Module,
          scale: Optional[Tensor]) -> Tensor:
    """``relu(scale * bn(conv(out)) + shortcut(x))``. The fused op needs the
    shortcut first, torchvision computes it after ``bn``; that order is
    unobservable unless conv, bn or relu have hooks (or global hooks exist),
    and then torchvision's order is kept so that hooks fire in the same order.
    With a scale (stochastic depth) the epilogue cannot scale the branch: the
    branch is one op, the join ``add_act`` another."""
    if part_blocker(conv, bn, block.relu) is None:
        if scale is None:
            return conv_bn_act(out, conv, bn, block.relu, _shortcut(block, x))
        out = conv_bn_act(out, conv, bn, None)
        shortcut = _shortcut(block, x)
        if input_blocker(out, None, shortcut) is None:
            return ops.add_act(out, shortcut, ACTS[type(block.relu)], scale)
    else:
        out = bn(conv(out))
        shortcut = _shortcut(block, x)
    if scale is not None:
        out = out * scale.view(-1, 1, 1, 1).to(out.dtype)
    out += shortcut
    return block.relu(out)


# ------------------------------------------------- prepared eval blocks (CPU)
# In eval without autograd on CPU a block whose parts would all run fused and
# prepared runs as one chain of its conv plans and the downsample's
# (fuse/_prepared.py's block chains; ResNet-50 eval batch 1 on the Intel Xeon
# VM: 37.6 -> 35.2 ms, alternating processes).
def _downsample_stage(block: nn.Module) -> Optional[tuple]:
    """``()`` without a downsample, ``((conv, bn),)`` for an unobserved
    ``Sequential(Conv2d, BatchNorm2d)``, else None (it runs as a module)."""
    ds = block.downsample
    if ds is None:
        return ()
    if type(ds) is not nn.Sequential or observed(ds) or len(ds._modules) != 2:
        return None
    return (tuple(ds._modules.values()),)


def _prepared_block(block: nn.Module, x: Tensor, stages: tuple) -> Optional[Tensor]:
    """The block's eval forward as its chain, or None where the parts must run
    one by one (the caller then does). ``stages``: the branch's (conv, bn)
    pairs; each but the last is followed by block.relu, the last joins the
    shortcut and then block.relu."""
    # The context (tracers) first: FX records every parameter or buffer read.
    if context_blocker() is not None:
        return None
    relu, ds = block.relu, _downsample_stage(block)
    if ds is None or input_blocker(x, stages[0][0].weight) is not None:
        return None
    pairs = stages + ds
    if (_prepared.pairs_blocker(pairs) or act_blocker(relu)) is not None:
        return None
    act = ACTS[type(relu)]
    sources = _prepared.conv_bn_sources(pairs)
    if not (_prepared.may_prepare(x, None, sources) and cpu_conv_ok(x, x, act)):
        return None
    key = (act, _prepared.meta_of(x),
           tuple((c.stride, c.padding, c.dilation, c.groups, b.eps) for c, b in pairs))

    def build(x):
        plans, out = [], x
        for conv, bn in stages[:-1]:
            out = chain_step(out, conv, bn, act, None, plans)
        shortcut = chain_step(x, *ds[0], "identity", None, plans) if ds else x
        y = chain_step(out, *stages[-1], act, shortcut, plans)
        return y, None if None in plans else _chain(plans, len(stages), bool(ds))
    return _prepared.run_chain(block, x, sources, key, build)


def _chain(plans: list, branch: int, downsample: bool):
    """``run(x)``: the branch's plans in order, the shortcut (x, or the
    downsample's plan) as the last one's residual (``plans`` in the build's
    order: the branch's head, the downsample, the last)."""
    head, last = plans[:branch - 1], plans[-1]
    ds_plan = plans[branch - 1] if downsample else None

    def run(x):
        out = x
        for plan in head:
            out = _prepared.run_plan(plan, out)
        shortcut = x if ds_plan is None else _prepared.run_plan(ds_plan, x)
        return _prepared.run_plan(last, out, shortcut)
    return run


def basic_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    scale = drop_scale(block, x)
    if scale is None:
        y = _prepared_block(block, x, ((block.conv1, block.bn1), (block.conv2, block.bn2)))
        if y is not None:
            return y
    out = conv_bn_act(x, block.conv1, block.bn1, block.relu)
    return _join(block, x, out, block.conv2, block.bn2, scale)


def bottleneck_forward(block: nn.Module, x: Tensor) -> Tensor:
    scale = drop_scale(block, x)
    if scale is None:
        y = _prepared_block(block, x, ((block.conv1, block.bn1), (block.conv2, block.bn2),
                                       (block.conv3, block.bn3)))
        if y is not None:
            return y
    out = conv_bn_act(x, block.conv1, block.bn1, block.relu)
    out = conv_bn_act(out, block.conv2, block.bn2, block.relu)
    return _join(block, x, out, block.conv3, block.bn3, scale)


def set_stochastic_depth(model: nn.Module, p: float) -> None:
    """Block l of the model's L resnet blocks gets p_l = p * l / L (p = 0
    removes it). A block this family's forward does not run is warned about:
    it would silently keep its whole branch."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"stochastic_depth_prob must be in [0, 1], got {p}")
    blocks = [m for m in model.modules() if family_of(m) in _BLOCK_FAMILIES]
    for l, block in enumerate(blocks, 1):
        if p == 0.0:
            block.__dict__.pop(SD_ATTR, None)
            continue
        block.__dict__[SD_ATTR] = p * l / len(blocks)
        if bound(block) is None or bound(block).fn not in (basic_block_forward, bottleneck_forward):
            warnings.warn(f"stochastic depth: a {type(block).__name__} whose forward is not the "
                          "fused one ignores it", stacklevel=3)


def resnet_forward(model: nn.Module, x: Tensor) -> Tensor:
    # On CPU a fused stem makes the trunk channels_last (see fuse.layout);
    # stochastic depth draws one mask value per sample, whatever the layout.
    x = cpu_trunk_layout(x, model.conv1, model.bn1, model.relu)
    x = conv_bn_act(x, model.conv1, model.bn1, model.relu)
    x = model.maxpool(x)
    x = model.layer1(x)
    x = model.layer2(x)
    x = model.layer3(x)
    x = model.layer4(x)
    x = model.avgpool(x)
    x = torch.flatten(x, 1)
    return model.fc(x)


def _named(module: nn.Module, *names: str) -> list:
    return [(n, getattr(module, n)) for n in names]


def _basic_patterns(block: nn.Module) -> list:
    return [Pattern(*_named(block, "conv1", "bn1", "relu")),
            Pattern(*_named(block, "conv2", "bn2", "relu"), residual=True)]


def _bottleneck_patterns(block: nn.Module) -> list:
    return [Pattern(*_named(block, "conv1", "bn1", "relu")),
            Pattern(*_named(block, "conv2", "bn2", "relu")),
            Pattern(*_named(block, "conv3", "bn3", "relu"), residual=True)]


def _stem_patterns(model: nn.Module) -> list:
    return [Pattern(*_named(model, "conv1", "bn1", "relu"))]


_TV = "torchvision.models.resnet."
_BLOCK_FAMILIES = (Family("resnet.BasicBlock", basic_block_forward, _basic_patterns),
                   Family("resnet.Bottleneck", bottleneck_forward, _bottleneck_patterns))
register(_TV + "BasicBlock", _BLOCK_FAMILIES[0])
register(_TV + "Bottleneck", _BLOCK_FAMILIES[1])
register(_TV + "ResNet", Family("resnet.stem", resnet_forward, _stem_patterns))
