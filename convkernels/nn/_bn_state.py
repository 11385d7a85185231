"""How a BatchNorm module's state maps to the fused ops' BN arguments, shared by
every module that owns an ``nn.BatchNorm2d`` (or is one)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn


@dataclass
class BNArgs:
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    training: bool  # normalise with batch statistics
    momentum: float
    counting: bool  # num_batches_tracked is to be incremented after the op


def bn_args(bn: nn.modules.batchnorm._BatchNorm) -> BNArgs:
    """The arguments ``F.batch_norm`` would get from ``bn.forward`` (same rules:
    ``momentum=None`` is a cumulative average, ``track_running_stats=False``
    always uses batch statistics)."""
    counting = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    if bn.momentum is not None:
        factor = bn.momentum
    elif counting:
        factor = 1.0 / (float(bn.num_batches_tracked) + 1.0)
    else:
        factor = 0.0
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return BNArgs(bn.running_mean if track else None, bn.running_var if track else None,
                  use_batch_stats, factor, counting)


def count_batch(bn: nn.modules.batchnorm._BatchNorm, args: BNArgs) -> None:
    """Called after the op succeeded, so that a rejected input mutates nothing."""
    if args.counting:
        bn.num_batches_tracked.add_(1)
