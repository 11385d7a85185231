"""nt_xent_loss: SimCLR's normalised temperature-scaled cross entropy.

Over the 2N views ``z = cat(z1, z2)`` (``[2N, D]``), with ``u_i = z_i / |z_i|``
and ``s_ij = <u_i, u_j> / temperature``::

    loss_i = -s_{i,p(i)} + logsumexp_{j != i} s_ij,   p(i) = (i + N) % 2N
    loss   = mean_i loss_i

Ops: ``nt_xent_loss`` (public; composite of ``nt_xent_forward`` or, on the
``reference`` backend, of aten ops), ``nt_xent_forward`` and
``nt_xent_backward``. The fused backends never hold the 2N x 2N similarity
matrix: the forward keeps an online logsumexp per row and saves only the
``[2N]`` row logsumexps; the backward recomputes the similarities block by block
(see ``nt_xent_forward`` in ops/primitives.py for the gradient it computes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend
from . import reference
from ._library import LIB, needs_grad
from .primitives import acc_dtype

OP = "nt_xent_loss"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@torch.library.custom_op("convkernels::nt_xent_forward", mutates_args=())
def nt_xent_forward(z: Tensor, temperature: float, impl: str) -> tuple[Tensor, Tensor]:
    """(loss in z's dtype, row logsumexps ``[2N]`` in the accumulation dtype)
    of the stacked views ``z``, on backend ``impl``."""
    row_loss, lse = backend.kernels(impl).nt_xent_forward(z.contiguous(), temperature)
    # The mean is a plain fixed-order reduction of 2N values: deterministic.
    return row_loss.mean().to(z.dtype), lse


@nt_xent_forward.register_fake
def _(z, temperature, impl):
    return z.new_empty(()), z.new_empty(z.size(0), dtype=acc_dtype(z.dtype))


@torch.library.custom_op("convkernels::nt_xent_backward", mutates_args=())
def nt_xent_backward(grad: Tensor, z: Tensor, lse: Tensor, temperature: float,
                     impl: str) -> Tensor:
    """Gradient of the loss w.r.t. ``z``, given the loss's gradient ``grad`` (0-dim)."""
    g = grad.to(acc_dtype(z.dtype)).reshape(())
    return backend.kernels(impl).nt_xent_backward(g, z.contiguous(), lse, temperature)


@nt_xent_backward.register_fake
def _(grad, z, lse, temperature, impl):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    z, temperature, impl = inputs
    ctx.save_for_backward(z, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.temperature, ctx.impl = temperature, impl


def _backward(ctx, grad, _grad_lse):
    z, lse = ctx.saved_tensors
    gz = torch.ops.convkernels.nt_xent_backward(grad, z, lse, ctx.temperature, ctx.impl)
    return gz, None, None


nt_xent_forward.register_autograd(_backward, setup_context=_setup_context)


def _check(z1, z2, temperature) -> None:
    for name, t in (("z1", z1), ("z2", z2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{OP}: {name} must be a 2-D [N, D] tensor, got {t.dim()}-D shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{OP}: {name} must be float32, float16, bfloat16 or float64, "
                            f"got {t.dtype}")
    if z2.shape != z1.shape:
        raise ValueError(f"{OP}: z2 has shape {tuple(z2.shape)} but z1 has shape {tuple(z1.shape)}")
    if z1.size(0) == 0:
        raise ValueError(f"{OP}: z1 and z2 must hold at least one pair (N >= 1), got N = 0")
    if z1.size(1) == 0:
        raise ValueError(f"{OP}: z1 and z2 must have at least one feature (D >= 1), got D = 0")
    if z2.dtype != z1.dtype:
        raise TypeError(f"{OP}: z2 has dtype {z2.dtype} but z1 has dtype {z1.dtype}")
    if z2.device != z1.device:
        raise ValueError(f"{OP}: z2 is on {z2.device} but z1 is on {z1.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{OP}: temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{OP}: temperature must be finite and > 0, got {temperature}")


LIB.define("nt_xent_loss(Tensor z1, Tensor z2, float temperature=0.5) -> Tensor")


def _nt_xent_loss(z1, z2, temperature=0.5):
    _check(z1, z2, temperature)
    temperature = float(temperature)
    z = torch.cat([z1, z2])
    grad = needs_grad(z1, z2)

    def run(name):  # forward (and backward, when training): what a step spends on the loss
        loss, lse = torch.ops.convkernels.nt_xent_forward(z, temperature, name)
        if grad:
            torch.ops.convkernels.nt_xent_backward(torch.ones_like(loss), z, lse, temperature,
                                                   name)
        return loss

    impl = backend.resolve_tuned(z1.device, (OP, backend.tensor_key(z), grad), run)
    if impl == "reference":
        return reference.nt_xent_loss(z1, z2, temperature)
    loss, _ = torch.ops.convkernels.nt_xent_forward(z, temperature, impl)
    return loss


LIB.impl("nt_xent_loss", _nt_xent_loss, "CompositeImplicitAutograd")


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent loss (a 0-dim tensor in z1's dtype) of the paired views
    ``z1``, ``z2`` (``[N, D]`` each, same dtype and device): the mean over the
    2N anchors of ``logsumexp_{j != i} s_ij - s_{i,p(i)}`` with cosine
    similarities ``s`` divided by ``temperature``."""
    if torch.jit.is_tracing():  # see _library.run_body
        return _nt_xent_loss(z1, z2, temperature)
    return torch.ops.convkernels.nt_xent_loss(z1, z2, temperature)
