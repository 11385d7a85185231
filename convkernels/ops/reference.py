"""Reference implementations: composites of aten ops.

They define what every fused op computes, serve as the ``reference`` backend,
and are the oracle of the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_ACTS = {
    "relu": F.relu,
    "identity": lambda z: z,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


def activation(z: torch.Tensor, act: str) -> torch.Tensor:
    return _ACTS[act](z)


def bn_act(x, running_mean, running_var, weight=None, bias=None, training=False,
           momentum=0.1, eps=1e-5, act="relu", residual: Optional[torch.Tensor] = None):
    """``act(F.batch_norm(x, ...) [+ residual])``."""
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return activation(z, act)


def add_act(x, residual, act="relu", scale: Optional[torch.Tensor] = None):
    """``act(residual + scale[n] * x)``; ``scale`` is a per-sample vector or None."""
    if scale is not None:
        x = x * scale.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return activation(residual + x, act)


def conv_bn_act(x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias,
                training=False, momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, groups=1,
                act="relu", residual=None):
    """``act(batch_norm(conv2d(x)) [+ residual])``."""
    z = F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation, groups)
    return bn_act(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, act, residual)


def conv_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, act="relu",
             residual=None):
    """``act(conv2d(x, weight, bias) [+ residual])``."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        z = z + residual
    return activation(z, act)


def bn_act_conv(x, running_mean, running_var, bn_weight, bn_bias, training=False, momentum=0.1,
                eps=1e-5, act="relu", conv_weight=None, conv_bias=None, stride=1, padding=0,
                dilation=1, groups=1, stats=None):
    """``conv2d(act(batch_norm(x)))``. ``stats``: x's batch (mean, biased var),
    when computed elsewhere (training only)."""
    if stats is None:
        t = bn_act(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, act)
    else:
        mean, var = stats
        if running_mean is not None:
            n = x.numel() // x.size(1)
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(var.to(running_var.dtype) * (n / (n - 1)),
                                                    alpha=momentum)
        shape = (1, -1, 1, 1)
        z = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype) + eps).view(shape)
        if bn_weight is not None:
            z = z * bn_weight.to(x.dtype).view(shape)
        if bn_bias is not None:
            z = z + bn_bias.to(x.dtype).view(shape)
        t = activation(z, act)
    return F.conv2d(t, conv_weight, conv_bias, stride, padding, dilation, groups)


def nt_xent_loss(z1, z2, temperature=0.5):
    """SimCLR's NT-Xent: over the 2N views ``z = cat(z1, z2)``, cosine similarities
    ``s_ij / temperature`` with the self-pairs masked out, cross entropy of each
    anchor i against its positive ``(i + N) % 2N``; mean over the 2N anchors."""
    n = z1.size(0)
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (u @ u.T) / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    sim = sim.masked_fill(eye, float("-inf"))
    rows = torch.arange(2 * n, device=u.device)
    return (torch.logsumexp(sim, dim=1) - sim[rows, (rows + n) % (2 * n)]).mean()


def highway_gate(h, gate, x):
    """``h * t + x * (1 - t)``, ``t = sigmoid(gate)``: a highway layer's gate
    combination, in the eager formula's own form (so it rounds as it does)."""
    t = torch.sigmoid(gate)
    return h * t + x * (1 - t)
