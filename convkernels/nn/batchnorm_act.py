"""BatchNormAct2d: nn.BatchNorm2d followed by an activation (and optional residual add), fused."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ..ops._checks import check_act
from ._bn_state import bn_args, count_batch


class BatchNormAct2d(nn.BatchNorm2d):
    """``act(BatchNorm2d(x) [+ residual])`` in one fused op.

    A subclass of :class:`torch.nn.BatchNorm2d` with exactly its parameters,
    buffers and state-dict keys (BatchNorm2d checkpoints load strictly), and the
    same training semantics, ``momentum=None`` (cumulative average) included.
    The only addition is ``act``: ``"relu"``, ``"identity"``, ``"silu"`` or ``"sigmoid"``.

    Unlike BatchNorm2d, a rejected input leaves every buffer untouched
    (``num_batches_tracked`` included).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, act: str = "relu",
                 device=None, dtype=None):
        check_act(type(self).__name__, act)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.act = act

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(x)
        a = bn_args(self)
        y = ops.bn_act(x, a.running_mean, a.running_var, self.weight, self.bias, a.training,
                       a.momentum, self.eps, self.act, residual)
        count_batch(self, a)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"
