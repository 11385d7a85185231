"""Dense layers with BatchNorm1d: ``LinearBNAct`` (``models.lenet``), whose
forward is ``act(bn(linear(x)))``.

The linear layer is called as itself (no op fuses it); BatchNorm1d on an
[N, C] input is BatchNorm2d on its [N, C, 1, 1] view (the same per-channel
statistics over N values, the same running-stat update with N - 1 in the
unbiased variance, the same ``num_batches_tracked``), so BN and the activation
run as one ``bn_act`` there.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ..nn._bn_state import bn_args, count_batch
from ._guard import ACTS, act_blocker, bn_blocker, context_blocker, input_blocker
from ._registry import Family, Pattern, register


def _blocker(y, bn: nn.Module, act: nn.Module) -> Optional[str]:
    why = context_blocker() or bn_blocker(bn, nn.BatchNorm1d) or act_blocker(act)
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
    return [Pattern(None, ("bn", unit.bn), ("act", unit.act), bn_class=nn.BatchNorm1d)]


register("convkernels.models.lenet.LinearBNAct",
         Family("dense1d.LinearBNAct", linear_bn_act_forward, _patterns))
