"""highway_gate: ``h * t + x * (1 - t)`` with ``t = sigmoid(gate)``, a highway
layer's gate combination (Srivastava et al. 2015) in one pass.

``h`` is the layer's transform output H(x), ``gate`` the gate conv's output
before the sigmoid, ``x`` the layer input (the carry path). Eager torch makes
four passes (sigmoid, two products, the sum; five with ``1 - t``) and autograd
keeps t and 1 - t; this op makes one pass forward and one backward.

Ops: ``highway_gate`` (public; composite of ``highway_gate_forward`` or, on the
``reference`` backend and while exporting, of aten ops), ``highway_gate_forward``
and ``highway_gate_backward``. The backward saves the three inputs and
recomputes t from ``gate`` (one exp per element in a memory-bound pass):
saving t instead would cost the forward a second full-size output to write,
and would keep as much memory as ``gate`` does (h and x are kept by the
transform's and the gate conv's own backward anyway, so they add nothing).

Autocast: as for add_act, nothing is cast. The eager formula's sigmoid, mul and
add are on no autocast list, so it runs in its inputs' dtype, and so does the op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend
from . import reference
from ._checks import check_input, check_like
from ._library import LIB, dense, memory_format, needs_grad, plain_eager, run_body, unpack_grads

OP = "highway_gate"


def _prepare(h, *others):
    fmt = memory_format(h)
    return [dense(t, fmt) for t in (h, *others)]


def _forward(h, gate, x, impl):
    return backend.kernels(impl).highway_gate_forward(*_prepare(h, gate, x))


@torch.library.custom_op("convkernels::highway_gate_forward", mutates_args=())
def highway_gate_forward(h: Tensor, gate: Tensor, x: Tensor, impl: str) -> Tensor:
    """``impl``: the backend."""
    return _forward(h, gate, x, impl)


@highway_gate_forward.register_fake
def _(h, gate, x, impl):
    return torch.empty_like(dense(h, memory_format(h)))


@torch.library.custom_op("convkernels::highway_gate_backward", mutates_args=())
def highway_gate_backward(grad_y: Tensor, h: Tensor, gate: Tensor, x: Tensor,
                          output_mask: list[bool], impl: str) -> list[Tensor]:
    """Gradients of (h, gate, x), only those set in output_mask."""
    h, gate, x, grad_y = _prepare(h, gate, x, grad_y)
    grads = backend.kernels(impl).highway_gate_backward(grad_y, h, gate, x, *output_mask)
    return [g for g, need in zip(grads, output_mask) if need]


@highway_gate_backward.register_fake
def _(grad_y, h, gate, x, output_mask, impl):
    return [torch.empty_like(dense(h, memory_format(h))) for need in output_mask if need]


def _setup_context(ctx, inputs, output):
    h, gate, x, impl = inputs
    ctx.save_for_backward(h, gate, x)
    ctx.impl = impl


def _backward(ctx, grad_y):
    h, gate, x = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    grads = torch.ops.convkernels.highway_gate_backward(grad_y, h, gate, x, mask, ctx.impl)
    return (*unpack_grads(grads, mask), None)


highway_gate_forward.register_autograd(_backward, setup_context=_setup_context)


LIB.define("highway_gate(Tensor h, Tensor gate, Tensor x) -> Tensor")


def _highway_gate(h, gate, x):
    check_input(OP, h, "h")
    check_like(OP, "gate", gate, h, "h")
    check_like(OP, "x", x, h, "h")
    impl = backend.resolve(h.device)
    if impl == "reference":
        return reference.highway_gate(h, gate, x)
    if not needs_grad(h, gate, x) and plain_eager(h, gate, x):
        return _forward(h, gate, x, impl)  # inference: no custom-op layers (~15 us a call)
    return torch.ops.convkernels.highway_gate_forward(h, gate, x, impl)


LIB.impl("highway_gate", _highway_gate, "CompositeImplicitAutograd")


def highway_gate(h: Tensor, gate: Tensor, x: Tensor) -> Tensor:
    """Fused ``h * sigmoid(gate) + x * (1 - sigmoid(gate))``.

    ``h``: the transform output ``[N, C, H, W]``; ``gate``: the gate's
    pre-activation, ``x``: the carried input, both of h's shape, dtype and
    device. Differentiable in all three.
    """
    if run_body(h, gate, x):  # the body, without the dispatcher round trip
        return _highway_gate(h, gate, x)
    return torch.ops.convkernels.highway_gate(h, gate, x)
