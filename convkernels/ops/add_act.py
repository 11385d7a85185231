"""add_act: ``act(residual + scale[n] * x)``, the residual join of a block.

``x`` is the block's branch output, ``residual`` its shortcut, and ``scale`` an
optional per-sample vector scaling the branch (stochastic depth: 0 drops a
sample's branch, 1/(1-p) keeps it). ``scale`` is a constant mask: it gets no
gradient and must not require one.

Ops: ``add_act`` (public; composite of ``add_act_forward`` or, on the
``reference`` backend, of aten ops), ``add_act_forward`` and ``add_act_backward``.
The backward recomputes the pre-activation from x and residual.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from . import reference
from ._checks import check_act, check_input, check_like, check_vector
from ._library import LIB, dense, memory_format, unpack_grads
from .primitives import acc_dtype

OP = "add_act"


def _prepare(x, residual, scale):
    fmt = memory_format(x)
    scale = None if scale is None else scale.to(acc_dtype(x.dtype)).contiguous()
    return dense(x, fmt), dense(residual, fmt), scale


@torch.library.custom_op("convkernels::add_act_forward", mutates_args=())
def add_act_forward(x: Tensor, residual: Tensor, act: str, scale: Optional[Tensor],
                    impl: str) -> Tensor:
    """``impl``: the backend."""
    k = backend.kernels(impl)
    x, residual, scale = _prepare(x, residual, scale)
    return k.add_act_forward(x, residual, scale, act)


@add_act_forward.register_fake
def _(x, residual, act, scale, impl):
    return torch.empty_like(dense(x, memory_format(x)))


@torch.library.custom_op("convkernels::add_act_backward", mutates_args=())
def add_act_backward(grad_y: Tensor, x: Tensor, residual: Tensor, act: str,
                     scale: Optional[Tensor], output_mask: list[bool], impl: str) -> list[Tensor]:
    """Gradients of (x, residual), only those set in output_mask."""
    k = backend.kernels(impl)
    x, residual, scale = _prepare(x, residual, scale)
    grad_y = dense(grad_y, memory_format(x))
    grad_x, grad_r = k.add_act_backward(grad_y, x, residual, scale, act, *output_mask)
    return [g for g, need in zip((grad_x, grad_r), output_mask) if need]


@add_act_backward.register_fake
def _(grad_y, x, residual, act, scale, output_mask, impl):
    return [torch.empty_like(dense(x, memory_format(x))) for need in output_mask if need]


def _setup_context(ctx, inputs, output):
    x, residual, act, scale, impl = inputs
    ctx.save_for_backward(x, residual, scale)
    ctx.act, ctx.impl = act, impl


def _backward(ctx, grad_y):
    x, residual, scale = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    if scale is None and all(mask):
        # Without a scale both gradients are the same tensor gz: one output
        # written instead of two equal ones (aten's add backward shares it too).
        (g,) = torch.ops.convkernels.add_act_backward(grad_y, x, residual, ctx.act, None,
                                                      [False, True], ctx.impl)
        return g, g, None, None, None
    gx, gr = unpack_grads(torch.ops.convkernels.add_act_backward(
        grad_y, x, residual, ctx.act, scale, mask, ctx.impl), mask)
    return gx, gr, None, None, None


add_act_forward.register_autograd(_backward, setup_context=_setup_context)


LIB.define("add_act(Tensor x, Tensor residual, str act, Tensor? scale) -> Tensor")


def _add_act(x, residual, act, scale):
    check_input(OP, x)
    check_like(OP, "residual", residual, x)
    check_act(OP, act)
    if scale is not None:
        check_vector(OP, "scale", scale, x.size(0), "the batch size of x", x)
        if scale.requires_grad:
            raise ValueError(f"{OP}: scale is a constant mask and must not require grad")
    impl = backend.resolve(x.device)
    if impl == "reference":
        return reference.add_act(x, residual, act, scale)
    return torch.ops.convkernels.add_act_forward(x, residual, act, scale, impl)


LIB.impl("add_act", _add_act, "CompositeImplicitAutograd")


def add_act(x: Tensor, residual: Tensor, act: str = "relu", scale: Optional[Tensor] = None) -> Tensor:
    """Fused ``act(residual + scale[n] * x)``.

    ``x``: the branch output ``[N, C, H, W]``; ``residual``: the shortcut, same
    shape, dtype and device; ``scale``: optional ``[N]`` per-sample factor on the
    branch (stochastic depth), not differentiated.
    """
    if torch.jit.is_tracing():  # see _library.run_body
        return _add_act(x, residual, act, scale)
    return torch.ops.convkernels.add_act(x, residual, act, scale)
