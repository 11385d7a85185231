"""Conv + BatchNorm + activation modules on the fused ops.

Parameters live in ordinary ``conv`` (nn.Conv2d) and ``bn`` (nn.BatchNorm2d)
submodules, so state-dict keys are the usual ``conv.weight``, ``bn.running_mean``,
...; only ``forward`` calls the fused op. Eval-mode BN folding never writes into
the parameters: the folded weights are a cached, derived tensor.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ..ops._checks import check_act
from ._bn_state import bn_args, count_batch


def _conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
          device, dtype):
    if isinstance(padding, str):
        raise ValueError("padding must be an int or a pair of ints (string modes are not supported)")
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                     bias, device=device, dtype=dtype)


class ConvBNAct2d(nn.Module):
    """``act(BatchNorm2d(Conv2d(x)) [+ residual])`` as one fused op.

    ``forward(x, residual=None, out=None)``: ``residual`` is added before the
    activation (the ResNet join); ``out`` is an optional preallocated result,
    e.g. a channel slice of a concatenation buffer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, act: str = "relu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None):
        super().__init__()
        check_act(type(self).__name__, act)
        self.conv = _conv(in_channels, out_channels, kernel_size, stride, padding, dilation,
                          groups, bias, device, dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, device=device, dtype=dtype)
        self.act = act

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                out: Optional[Tensor] = None) -> Tensor:
        c, a = self.conv, bn_args(self.bn)
        y = ops.conv_bn_act(x, c.weight, c.bias, a.running_mean, a.running_var, self.bn.weight,
                            self.bn.bias, a.training, a.momentum, self.bn.eps, c.stride, c.padding,
                            c.dilation, c.groups, self.act, residual, out)
        count_batch(self.bn, a)
        return y

    def extra_repr(self) -> str:
        return f"act={self.act!r}"


class BNActConv2d(nn.Module):
    """``Conv2d(act(BatchNorm2d(x)))``, the pre-activation unit of DenseNet and
    pre-activation ResNet, as one fused op; backward recomputes ``act(bn(x))``.

    ``forward(x, stats=None, out=None)``: ``stats`` are x's batch statistics
    ``(mean, biased var)`` when already computed (training only); ``out`` an
    optional preallocated result.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, act: str = "relu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None):
        super().__init__()
        check_act(type(self).__name__, act)
        self.bn = nn.BatchNorm2d(in_channels, eps, momentum, device=device, dtype=dtype)
        self.conv = _conv(in_channels, out_channels, kernel_size, stride, padding, dilation,
                          groups, bias, device, dtype)
        self.act = act

    def forward(self, x: Tensor, stats=None, out: Optional[Tensor] = None) -> Tensor:
        c, a = self.conv, bn_args(self.bn)
        y = ops.bn_act_conv(x, a.running_mean, a.running_var, self.bn.weight, self.bn.bias,
                            a.training, a.momentum, self.bn.eps, self.act, c.weight, c.bias,
                            c.stride, c.padding, c.dilation, c.groups, stats, out)
        count_batch(self.bn, a)
        return y

    def extra_repr(self) -> str:
        return f"act={self.act!r}"
