"""The fused parts the families are made of: one op when the guard allows it,
else the modules called one by one, as the original forwards call them."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ..nn._bn_state import bn_args, count_batch
from ._guard import ACTS, blocker


def _act_name(act: Optional[nn.Module]) -> str:
    return "identity" if act is None else ACTS[type(act)]


def conv_bn_act(x: Tensor, conv: nn.Module, bn: nn.Module, act: Optional[nn.Module],
                residual: Optional[Tensor] = None) -> Tensor:
    """``act(bn(conv(x)) [+ residual])``; ``act=None``: no activation module.
    The unfused path adds the residual in place, as torchvision's blocks do
    (``out += identity``), so a hook that kept bn's output sees the same."""
    if blocker(x, conv, bn, act, residual) is None:
        a = bn_args(bn)
        y = ops.conv_bn_act(x, conv.weight, conv.bias, a.running_mean, a.running_var,
                            bn.weight, bn.bias, a.training, a.momentum, bn.eps, conv.stride,
                            conv.padding, conv.dilation, conv.groups, _act_name(act), residual)
        count_batch(bn, a)
        return y
    y = bn(conv(x))
    if residual is not None:
        y += residual
    return y if act is None else act(y)


def bn_act(x: Tensor, bn: nn.Module, act: nn.Module) -> Tensor:
    """``act(bn(x))``."""
    if blocker(x, None, bn, act) is None:
        a = bn_args(bn)
        y = ops.bn_act(x, a.running_mean, a.running_var, bn.weight, bn.bias, a.training,
                       a.momentum, bn.eps, _act_name(act))
        count_batch(bn, a)
        return y
    return act(bn(x))
