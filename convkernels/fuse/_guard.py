"""When a fused part may run: the one check every family uses, at call time.

A fused forward is only allowed where it is the same computation as the
modules' own forwards. Anything that could make it differ sends the part back to
the modules: hooks (they would not fire inside a fused op, and what they return
would be ignored), a submodule that is not exactly the expected class (a
subclass, torch's SyncBatchNorm, a parametrized module: parametrize swaps the class, a
user's replacement), a forward overridden on an instance, conv quirks, tracers
that record module calls, and inputs the ops do not take. Hooks can be added
after ``optimize``, so this runs on every call: type checks and dict truthiness
on the success path, strings built only for a refusal.

Each function returns ``None`` when fusing is fine, else the reason (``explain``
shows it). Hooks on the module whose forward is bound need no check: its
``__call__`` runs them around the fused forward as around the original.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx._symbolic_trace as _fx
import torch.nn.modules.module as _module
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..nn.sync_batchnorm import SyncBatchNormAct2d
from ..ops._checks import FLOAT_DTYPES
from ._bind import bound

# FX's symbolic tracing records module calls; torch.export also sets the FX flag
# (older torch has only the combined test).
_fx_symbolic_tracing = getattr(_fx, "is_fx_symbolic_tracing", _fx.is_fx_tracing)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

# Activation modules the ops compute, by exact class (ReLU's inplace flag only
# changes which tensor holds the result, which no one sees inside a fused part).
ACTS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def context_blocker() -> Optional[str]:
    """Process-wide state: global module hooks fire for every module call, so a
    fused part would skip them; FX and TorchScript tracing record the calls they
    see, and must see the modules' own. torch.export (and the ONNX exporter,
    which runs it) gets the modules' own graph too: standard aten ops, which
    every consumer of an exported program and ONNX understand, with torch's
    own autograd and dynamic shapes; the fused ops are for eager and
    torch.compile."""
    m = _module
    if (m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
            or m._global_backward_pre_hooks):
        return "a global module hook is registered"
    if _fx_symbolic_tracing():
        return "torch.fx is tracing"
    if torch.jit.is_tracing():
        return "torch.jit is tracing"
    if _exporting() or torch.onnx.is_in_onnx_export():
        return "torch.export is tracing"
    return None


def observed(m: nn.Module) -> Optional[str]:
    """Why ``m`` must be called as a module rather than computed inside an
    enclosing fused part: hooks, or a forward set on the instance other than a
    fused one ``optimize`` bound (which computes the same)."""
    if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
        return "has a hook"
    if "forward" in m.__dict__ and bound(m) is None:
        return "its forward is overridden on the instance"
    return None


def _module_blocker(m: nn.Module) -> Optional[str]:
    if m._forward_pre_hooks:
        return "has a forward pre-hook"
    if m._forward_hooks:
        return "has a forward hook"
    if m._backward_hooks or m._backward_pre_hooks:
        return "has a backward hook"
    if "forward" in m.__dict__:
        return "its forward is overridden on the instance"
    return None


def _class_blocker(m: nn.Module, expected: type) -> Optional[str]:
    if parametrize.is_parametrized(m):
        return "is parametrized"
    return f"is {type(m).__name__}, not {expected.__name__}"


def conv_blocker(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return _class_blocker(conv, nn.Conv2d)
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return _module_blocker(conv)


def bn_blocker(bn: nn.Module, expected: type = nn.BatchNorm2d) -> Optional[str]:
    """``expected``: the BatchNorm class the part computes (BatchNorm1d on an
    [N, C] input is BatchNorm2d on its [N, C, 1, 1] view)."""
    # momentum=None, track_running_stats=False, affine=False: bn_args maps them.
    if type(bn) is not expected and not (expected is nn.BatchNorm2d and plain_sync(bn)
                                         and not bn.synchronises()):
        return _class_blocker(bn, expected)
    return _module_blocker(bn)


def plain_sync(bn: nn.Module) -> bool:
    """A ``convkernels.nn.convert_sync_batchnorm``'d BatchNorm2d: exactly
    BatchNorm2d unless it synchronises now (see ``_parts.synced``)."""
    return type(bn) is SyncBatchNormAct2d and bn.act == "identity"


def synced_blocker(bn: nn.Module, act: Optional[nn.Module]) -> Optional[str]:
    """Whether a part whose BatchNorm synchronises may still fold its
    activation module into the SyncBatchNormAct2d (the conv runs as a module)."""
    if not (plain_sync(bn) and bn.synchronises()):
        return "not a synchronising SyncBatchNormAct2d"
    return context_blocker() or _module_blocker(bn) or act_blocker(act)


def act_blocker(act: Optional[nn.Module]) -> Optional[str]:
    """``act=None``: the part has no activation module (act ``identity``)."""
    if act is None:
        return None
    if type(act) not in ACTS:
        return f"is {type(act).__name__}, not one of {', '.join(c.__name__ for c in ACTS)}"
    return _module_blocker(act)


def part_blocker(conv: Optional[nn.Module], bn: nn.Module,
                 act: Optional[nn.Module]) -> Optional[str]:
    """Everything but the input: [conv ->] bn [-> act] may be fused now."""
    return (context_blocker() or (conv is not None and conv_blocker(conv)) or bn_blocker(bn)
            or act_blocker(act) or None)


def _tensor_blocker(t, name: str) -> Optional[str]:
    if not isinstance(t, Tensor) or torch.overrides.has_torch_function_unary(t):
        return f"{name} is not a plain tensor"
    if t.dim() != 4:
        return f"{name} is {t.dim()}-D, not [N, C, H, W]"
    if t.dtype not in FLOAT_DTYPES:
        return f"{name} is {t.dtype}"
    kind = t.device.type
    if kind not in ("cpu", "cuda") or (kind != "cpu" and t.dtype == torch.float64):
        return f"{name} is {t.dtype} on {kind}"
    return None


def input_blocker(x, weight: Optional[Tensor], residual=None) -> Optional[str]:
    """The tensors a fused part gets. ``weight``: the conv's, whose dtype x must
    have unless autocast casts both (as it does for the conv itself)."""
    reason = _tensor_blocker(x, "input")
    if reason is None and residual is not None:
        reason = _tensor_blocker(residual, "residual")
        if reason is None and residual.dtype != x.dtype and not torch.is_autocast_enabled(
                x.device.type):
            reason = "residual and input dtypes differ"
    if (reason is None and weight is not None and weight.dtype != x.dtype
            and not torch.is_autocast_enabled(x.device.type)):
        reason = "input and weight dtypes differ"
    return reason


def blocker(x, conv: Optional[nn.Module], bn: nn.Module, act: Optional[nn.Module],
            residual=None) -> Optional[str]:
    """The call-time check of one part: ``None`` when it runs fused."""
    return part_blocker(conv, bn, act) or input_blocker(
        x, None if conv is None else conv.weight, residual)
