"""The fused parts the families are made of: one op when the guard allows it,
else the modules called one by one, as the original forwards call them. A
BatchNorm2d that ``convkernels.nn.convert_sync_batchnorm`` made a
SyncBatchNormAct2d is BatchNorm2d to the op unless it synchronises (training
in a process group); then the conv runs as a module and the SyncBatchNormAct2d
computes the activation module's function with its synchronised statistics."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ..nn._bn_state import bn_args, count_batch
from ..ops._fold import folded_conv_params
from ..ops.conv_act import acc_bias
from . import _prepared
from ._guard import (ACTS, act_blocker, blocker, context_blocker, conv_blocker, input_blocker,
                     synced_blocker)


def _act_name(act: Optional[nn.Module]) -> str:
    return "identity" if act is None else ACTS[type(act)]


def run_conv_bn_act(x: Tensor, conv: nn.Module, bn: nn.Module, act: str,
                    residual: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """The fused op on the modules' state, ``act`` by name, into ``out`` if
    given; for a caller whose guard check passed. Eval calls without autograd
    on CPU run prepared (``_prepared``)."""
    a = bn_args(bn)

    def op():
        return ops.conv_bn_act(x, conv.weight, conv.bias, a.running_mean, a.running_var,
                               bn.weight, bn.bias, a.training, a.momentum, bn.eps, conv.stride,
                               conv.padding, conv.dilation, conv.groups, act, residual, out)

    if out is None and not a.training:
        y = _prepared.run(x, conv, bn, act, residual, lambda: folded_conv_params(
            conv.weight, conv.bias, a.running_mean, a.running_var, bn.weight, bn.bias, bn.eps),
            op)
        if y is not None:
            return y
    y = op()
    count_batch(bn, a)
    return y


def chain_step(x: Tensor, conv: nn.Module, bn: nn.Module, act: str,
               residual: Optional[Tensor], plans: list) -> Tensor:
    """One part of a block chain being built (``_prepared.run_chain``): the
    part's own call, and the plan it kept appended to ``plans``."""
    y = run_conv_bn_act(x, conv, bn, act, residual)
    plans.append(_prepared.kept_plan(x, conv, bn, act, residual))
    return y


def conv_bn_act(x: Tensor, conv: nn.Module, bn: nn.Module, act: Optional[nn.Module],
                residual: Optional[Tensor] = None) -> Tensor:
    """``act(bn(conv(x)) [+ residual])``; ``act=None``: no activation module.
    The unfused path adds the residual in place, as torchvision's blocks do
    (``out += identity``), so a hook that kept bn's output sees the same."""
    if blocker(x, conv, bn, act, residual) is None:
        return run_conv_bn_act(x, conv, bn, _act_name(act), residual)
    if synced_blocker(bn, act) is None:
        return bn.synced(conv(x), _act_name(act), residual)
    y = bn(conv(x))
    if residual is not None:
        y += residual
    return y if act is None else act(y)


def conv_act(x: Tensor, conv: nn.Module, act: nn.Module) -> Tensor:
    """``act(conv(x))``, a conv without BatchNorm (VGG, AlexNet, LeNet, NiN):
    ``blocker``'s checks, less the BatchNorm's."""
    if (context_blocker() or conv_blocker(conv) or act_blocker(act)
            or input_blocker(x, conv.weight)) is None:
        name = _act_name(act)

        def op():
            return ops.conv_act(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                conv.dilation, conv.groups, name)

        y = _prepared.run(x, conv, None, name, None, lambda: (conv.weight, acc_bias(conv.bias, x)),
                          op)
        return op() if y is None else y
    return act(conv(x))


def bn_act(x: Tensor, bn: nn.Module, act: nn.Module) -> Tensor:
    """``act(bn(x))``."""
    if blocker(x, None, bn, act) is None:
        a = bn_args(bn)
        y = ops.bn_act(x, a.running_mean, a.running_var, bn.weight, bn.bias, a.training,
                       a.momentum, bn.eps, _act_name(act))
        count_batch(bn, a)
        return y
    if synced_blocker(bn, act) is None:
        return bn.synced(x, _act_name(act))
    return act(bn(x))


def bn_act_conv(x: Tensor, bn: nn.Module, act: nn.Module, conv: nn.Module) -> Tensor:
    """``conv(act(bn(x)))``, the pre-activation unit (DenseNet, ResNetV2)."""
    if blocker(x, conv, bn, act) is None:
        a = bn_args(bn)
        y = ops.bn_act_conv(x, a.running_mean, a.running_var, bn.weight, bn.bias, a.training,
                            a.momentum, bn.eps, ACTS[type(act)], conv.weight, conv.bias,
                            conv.stride, conv.padding, conv.dilation, conv.groups)
        count_batch(bn, a)
        return y
    if synced_blocker(bn, act) is None:
        return conv(bn.synced(x, _act_name(act)))
    return conv(act(bn(x)))
