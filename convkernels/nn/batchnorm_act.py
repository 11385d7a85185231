"""BatchNormAct2d: nn.BatchNorm2d followed by an activation (and optional residual add), fused."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._checks import check_act


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
        counting = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is not None:
            factor = self.momentum
        elif counting:  # cumulative moving average, as nn.BatchNorm2d
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)
        else:
            factor = 0.0
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        y = ops.bn_act(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight, self.bias, use_batch_stats, factor, self.eps, self.act, residual,
        )
        if counting:  # after the op: a rejected input mutates nothing
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"
