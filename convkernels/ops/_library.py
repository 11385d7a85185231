"""The torch.library fragment of the ``convkernels`` namespace and layout helpers
shared by the ops."""
from __future__ import annotations

from typing import Optional

import torch

LIB = torch.library.Library("convkernels", "FRAGMENT")


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The dense format the kernels run ``x`` in: channels_last if x is laid out
    that way (even with gaps), else NCHW."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    # A view with gaps (e.g. a channel slice of a concatenation buffer): channels
    # innermost means channels_last.
    if x.dim() == 4 and x.stride(1) < x.stride(3):
        return torch.channels_last
    return torch.contiguous_format


def dense(t: Optional[torch.Tensor], fmt: torch.memory_format) -> Optional[torch.Tensor]:
    """``t`` dense in ``fmt`` (no copy when it already is)."""
    return None if t is None else t.contiguous(memory_format=fmt)


def strided_like(t: Optional[torch.Tensor], ref: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` with ``ref``'s strides (a copy only where they differ). A conv
    weight's gradient follows the input's memory format in aten's backward;
    the ops promise (and their fake kernels say) the weight's own layout."""
    if t is None or t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def define_with_out(name: str, args: str, impl) -> None:
    """Define the composite op ``name(args) -> Tensor`` and its overload
    ``name.out(args, *, Tensor(c!) out) -> Tensor(c!)``, both implemented by
    ``impl(*args, out=None)``."""
    LIB.define(f"{name}{args}) -> Tensor")
    LIB.define(f"{name}.out{args}, *, Tensor(c!) out) -> Tensor(c!)")
    LIB.impl(name, impl, "CompositeImplicitAutograd")
    LIB.impl(f"{name}.out", lambda *a, out: impl(*a, out=out), "CompositeImplicitAutograd")


def needs_grad(*tensors) -> bool:
    """Whether autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors) -> bool:
    """Whether an op runs eagerly on plain tensors: no torch.compile tracing, no
    dispatch or torch-function mode (fake tensors, functionalization, opcheck),
    no tensor subclass. Only then may a call that needs no autograd run a custom
    op's implementation directly, skipping its Python dispatch layers (~50 us a
    call, as much as a small conv at batch 1); everywhere else the op must be
    called so that tracing records it. nn.Parameter counts as plain: it
    disables __torch_function__ and dispatches as a tensor."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


class DirectOps:
    """``torch.ops.convkernels`` for code that calls the ops from Python with
    autograd off (inside an autograd.Function, or in eval without autograd):
    eagerly on plain tensors (:func:`plain_eager`) a Python op's body runs
    directly, without the dispatcher's Python layers (~15-30 us a call, as
    much as the op at batch 1); anywhere else, the registered op, so that
    torch.compile and the other tracers record it."""

    def __getattr__(self, name: str):
        op = getattr(torch.ops.convkernels, name)
        if torch.compiler.is_compiling():
            # Dynamo cannot trace the lookup below (OPDEFS holds weak references)
            # and a trace would take the op anyway: give it the op, cache nothing,
            # so a first call under torch.compile works like any later one.
            return op
        from torch._library import custom_ops  # the Python ops' bodies, by qualified name

        opdef = getattr(custom_ops, "OPDEFS", {}).get(f"convkernels::{name}")
        body = getattr(opdef, "_init_fn", None)
        if body is None:
            return op

        def call(*args):
            if not torch.is_grad_enabled() and plain_eager(
                    *(a for a in args if isinstance(a, torch.Tensor))):
                return body(*args)
            return op(*args)

        setattr(self, name, call)  # looked up once
        return call


def run_body(*tensors) -> bool:
    """Whether a public op's wrapper runs the op's Python body itself rather
    than the registered op: eagerly on plain tensors (see :func:`plain_eager`),
    and under torch.jit.trace, whose tracer cannot record these ops (their
    ``int[2]`` and ``Scalar?`` arguments) but records the reference composite
    the body then runs (see backend.recording_for_export)."""
    return torch.jit.is_tracing() or plain_eager(*tensors)


def unpack_grads(grads, mask) -> tuple:
    """The list a backward op returned (only the gradients set in ``mask``) as a
    full tuple with None where a gradient was not asked for."""
    it = iter(grads)
    return tuple(next(it) if need else None for need in mask)


def into(y: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``y``, or ``out`` filled with it."""
    if out is None:
        return y
    out.copy_(y)
    return out
