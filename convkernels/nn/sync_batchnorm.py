"""Synchronised BatchNorm + activation: batch statistics over every process of a
group, on any device and backend (torch's nn.SyncBatchNorm refuses CPU tensors;
this one runs on CPU with gloo too).

Training computes each process's per-channel (count, mean, biased var) with the
fused ``batch_stats`` op, merges them across the group with Chan's formula in
two all-reduces of C-vectors (differentiable: ``torch.distributed.nn``), then
applies ``act(x * scale + shift [+ residual])`` with the fused ``bn_act``.
Gradients flow back through the merge to every process's statistics, exactly as
if one process had normalised the concatenated batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops
from ._bn_state import bn_args, count_batch
from .batchnorm_act import BatchNormAct2d


def _group_size(group) -> int:
    """Processes to synchronise with; 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group if group is not None else dist.group.WORLD)


def synced_batch_stats(x: Tensor, group=None) -> tuple[Tensor, Tensor, int]:
    """(mean, biased var, count) per channel of x over every process of ``group``,
    differentiable with respect to each process's x."""
    from torch.distributed.nn.functional import all_reduce

    mean_l, var_l = ops.batch_stats(x)
    n_l = x.numel() // x.size(1)
    # count (no gradient) and count * mean in one all-reduce; centred M2 in a second,
    # so no E[x^2] - mean^2 cancellation.
    head = all_reduce(torch.cat([mean_l.new_full((1,), float(n_l)), mean_l * n_l]), group=group)
    n = head[0].detach()
    mean = head[1:] / n
    var = all_reduce(n_l * (var_l + (mean_l - mean) ** 2), group=group) / n
    return mean, var, int(n.item())


class SyncBatchNormAct2d(BatchNormAct2d):
    """``act(BatchNorm2d(x) [+ residual])`` with batch statistics synchronised
    over ``process_group`` (default: the world) in training.

    Parameters, buffers and state-dict keys are BatchNorm2d's. Without an
    initialised process group, with one process, or in eval it is exactly
    :class:`BatchNormAct2d`. Make one from a model with :func:`convert_sync_batchnorm`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, act: str = "identity",
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, act,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def synchronises(self) -> bool:
        """Whether a forward now normalises with statistics merged over the
        group (training, more than one process); otherwise this module is
        exactly :class:`BatchNormAct2d`."""
        return bn_args(self).training and _group_size(self.process_group) > 1

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if not self.synchronises():
            return super().forward(x, residual)
        return self.synced(x, self.act, residual)

    def synced(self, x: Tensor, act: str, residual: Optional[Tensor] = None) -> Tensor:
        """``act(BN(x) [+ residual])`` on the group's statistics, ``act`` by name:
        the forward, or a fused part's that folds the activation module after
        an ``act="identity"`` one (``convkernels.optimize``)."""
        self._check_input_dim(x)
        a = bn_args(self)
        mean, var, count = synced_batch_stats(x, self.process_group)
        if count <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel "
                             f"over the process group when training, got {count}")
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(scale.dtype)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(shift.dtype)
        # act(x * scale + shift) is bn_act in eval with mean 0, var 1 and eps 0:
        # its weight and bias gradients are those of scale and shift.
        zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
        y = ops.bn_act(x, zeros, ones, scale, shift, False, 0.0, 0.0, act, residual)
        if a.running_mean is not None:
            torch.ops.convkernels.update_running_stats(a.running_mean, a.running_var,
                                                       mean.detach(), var.detach(), a.momentum,
                                                       count)
        count_batch(self, a)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, process_group={self.process_group!r}"


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every ``nn.BatchNorm2d`` (and :class:`BatchNormAct2d`, keeping its act) of
    ``module`` becomes a :class:`SyncBatchNormAct2d` holding the same Parameter
    and buffer objects, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does;
    returns the converted module (``module`` itself unless it is a BatchNorm)."""
    if type(module) in (nn.BatchNorm2d, BatchNormAct2d):
        out = SyncBatchNormAct2d(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, getattr(module, "act", "identity"),
                                 process_group)
        # the same objects, so an optimizer built before the conversion still steps them
        out._parameters.update(module._parameters)
        out._buffers.update(module._buffers)
        out.train(module.training)
        return out
    for name, child in list(module.named_children()):
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
