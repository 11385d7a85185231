"""timm's ``BatchNormAct2d`` and its ResNet ``BasicBlock`` / ``Bottleneck``.

* ``BatchNormAct2d`` (a BatchNorm2d subclass that applies ``drop`` then
  ``act`` after normalising): one ``bn_act`` when ``drop`` is a plain
  Identity and ``act`` one the ops compute; its forward is BatchNorm2d's
  (``bn_args`` maps the same state the same way) followed by those two.
* ResNet blocks: conv -> BN [-> drop_block Identity] -> act as one
  ``conv_bn_act``; the last conv's BN, the shortcut add and the act as one
  with the shortcut as residual when the block has no ``se`` and no
  ``drop_path`` (else those run as timm runs them). The stem lives in
  timm's ``ResNet.forward_features`` and is left to it.

Nothing here imports timm: the classes are registered by path, and a model
holding one has imported it.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import ops
from ..nn._bn_state import bn_args, count_batch
from ._guard import ACTS, act_blocker, context_blocker, input_blocker, part_blocker
from ._parts import conv_bn_act
from ._registry import Family, Pattern, family_of, register

_TIMM = "timm.layers.norm_act."
_RESNET = "timm.models.resnet."


# ---------------------------------------------------------------- BatchNormAct2d
def _skippable(m: nn.Module) -> bool:
    """An ``nn.Identity`` that may be left uncalled: nothing observes it."""
    return type(m) is nn.Identity and act_blocker(m) is None


def _bn_act_blocker(bn: nn.Module, x) -> Optional[str]:
    if family_of(bn) is not _BN_ACT:  # parametrize swaps the class
        return "is parametrized" if parametrize.is_parametrized(bn) else "its class changed"
    if not _skippable(bn.drop):
        return "drop is not a plain Identity"
    return context_blocker() or act_blocker(bn.act) or input_blocker(x, None)


def bn_act_forward(bn: nn.Module, x: Tensor) -> Tensor:
    if _bn_act_blocker(bn, x) is not None:
        return type(bn).forward(bn, x)
    a = bn_args(bn)
    y = ops.bn_act(x, a.running_mean, a.running_var, bn.weight, bn.bias, a.training, a.momentum,
                   bn.eps, ACTS[type(bn.act)])
    count_batch(bn, a)
    return y


def _bn_act_patterns(bn: nn.Module) -> list:
    return [Pattern(None, ("", bn), ("act", bn.act))]


_BN_ACT = Family("timm.BatchNormAct2d", bn_act_forward, _bn_act_patterns)


# ---------------------------------------------------------------- ResNet blocks
def _conv_bn_drop_act(x: Tensor, conv, bn, drop, act) -> Tensor:
    """``act(drop(bn(conv(x))))``; ``drop`` (timm's drop_block) is skipped only
    when it is an unobserved Identity."""
    if _skippable(drop):
        return conv_bn_act(x, conv, bn, act)
    return act(drop(bn(conv(x))))


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    return x if block.downsample is None else block.downsample(x)


def _join(block: nn.Module, x: Tensor, out: Tensor, conv, bn, act) -> Tensor:
    """timm's tail: ``act(drop_path(se(bn(conv(out)))) + shortcut(x))``. Fused
    only without se and drop_path; the shortcut is then computed before bn,
    which only hooks on conv, bn or act could see (and they refuse the part)."""
    if block.se is None and block.drop_path is None and part_blocker(conv, bn, act) is None:
        return conv_bn_act(out, conv, bn, act, _shortcut(block, x))
    out = bn(conv(out))
    if block.se is not None:
        out = block.se(out)
    if block.drop_path is not None:
        out = block.drop_path(out)
    out += _shortcut(block, x)
    return act(out)


def basic_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    out = block.aa(_conv_bn_drop_act(x, block.conv1, block.bn1, block.drop_block, block.act1))
    return _join(block, x, out, block.conv2, block.bn2, block.act2)


def bottleneck_forward(block: nn.Module, x: Tensor) -> Tensor:
    out = conv_bn_act(x, block.conv1, block.bn1, block.act1)
    out = block.aa(_conv_bn_drop_act(out, block.conv2, block.bn2, block.drop_block, block.act2))
    return _join(block, x, out, block.conv3, block.bn3, block.act3)


def _part(block: nn.Module, conv: str, bn: str, act: str, residual: bool = False) -> Pattern:
    return Pattern(*((n, getattr(block, n)) for n in (conv, bn, act)), residual=residual)


def _tail_patterns(block: nn.Module, conv: str, bn: str, act: str) -> list:
    if block.se is not None or block.drop_path is not None:
        return []
    return [_part(block, conv, bn, act, residual=True)]


def _drop_block_patterns(block: nn.Module, conv: str, bn: str, act: str) -> list:
    return [_part(block, conv, bn, act)] if type(block.drop_block) is nn.Identity else []


def _basic_patterns(block: nn.Module) -> list:
    return (_drop_block_patterns(block, "conv1", "bn1", "act1")
            + _tail_patterns(block, "conv2", "bn2", "act2"))


def _bottleneck_patterns(block: nn.Module) -> list:
    return ([_part(block, "conv1", "bn1", "act1")]
            + _drop_block_patterns(block, "conv2", "bn2", "act2")
            + _tail_patterns(block, "conv3", "bn3", "act3"))


register(_TIMM + "BatchNormAct2d", _BN_ACT)
register(_RESNET + "BasicBlock", Family("timm.BasicBlock", basic_block_forward, _basic_patterns))
register(_RESNET + "Bottleneck", Family("timm.Bottleneck", bottleneck_forward,
                                        _bottleneck_patterns))
