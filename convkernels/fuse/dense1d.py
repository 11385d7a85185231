"""Dense layers with BatchNorm1d: ``LinearBNAct`` (``models.lenet``), whose
forward is ``act(bn(linear(x)))``.

The linear layer is called as itself (no op fuses it); BatchNorm1d on an
[N, C] input is BatchNorm2d on its [N, C, 1, 1] view (the same per-channel
statistics over N values, the same running-stat update with N - 1 in the
unbiased variance, the same ``num_batches_tracked``), so BN and the activation
run as one ``bn_act`` there. The checks ``_guard`` lacks for this (its
``bn_blocker`` knows BatchNorm2d only; belongs there) are here, and so
``explain`` reports this part as left ("is BatchNorm1d, not BatchNorm2d")
while the call-time check below fuses it.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ..nn._bn_state import bn_args, count_batch
from ._guard import (ACTS, _class_blocker, _module_blocker, act_blocker, context_blocker,
                     input_blocker)
from ._registry import Family, Pattern, register


def _bn1d_blocker(bn: nn.Module) -> Optional[str]:
    if type(bn) is not nn.BatchNorm1d:
        return _class_blocker(bn, nn.BatchNorm1d)
    return _module_blocker(bn)


def _blocker(y, bn: nn.Module, act: nn.Module) -> Optional[str]:
    why = context_blocker() or _bn1d_blocker(bn) or act_blocker(act)
    if why:
        return why
    # BatchNorm1d also takes [N, C, L]; a Linear's 3-D output is [N, L, C], whose
    # channels are not BatchNorm1d's: only the 2-D case is fused.
    if not isinstance(y, Tensor) or y.dim() != 2:
        return "the linear output is not [N, C]"
    if bn_args(bn).training and y.size(0) <= 1:
        return "one value per channel in training"  # BatchNorm1d raises its own error
    return input_blocker(y[:, :, None, None], None)


def linear_bn_act_forward(unit: nn.Module, x: Tensor) -> Tensor:
    y = unit.linear(x)
    bn, act = unit.bn, unit.act
    if _blocker(y, bn, act) is not None:
        return act(bn(y))
    a = bn_args(bn)
    out = ops.bn_act(y[:, :, None, None], a.running_mean, a.running_var, bn.weight, bn.bias,
                     a.training, a.momentum, bn.eps, ACTS[type(act)])
    count_batch(bn, a)
    return out.flatten(1)


def _patterns(unit: nn.Module) -> list:
    return [Pattern(None, ("bn", unit.bn), ("act", unit.act))]


register("convkernels.models.lenet.LinearBNAct",
         Family("dense1d.LinearBNAct", linear_bn_act_forward, _patterns))
