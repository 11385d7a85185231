"""Highway layers (``models.highway``): the gate combination
``y = H(x) * T + x * (1 - T)``, ``T = sigmoid(gate(x))``, as one ``highway_gate``.

The fused forward calls ``transform`` and ``gate`` as modules, in the layer's
order (the transform, a Sequential, runs as its own fused ``conv_bn_act``; the
gate conv as itself: the op takes its pre-activation output), and replaces
``gate_act`` and the combination by the op. That part falls back to
``gate_act`` and the torch formula, exactly the layer's own forward, whenever
the guard says so: a hook on ``gate_act`` (or a global one, or a tracer), a
``gate_act`` that is not exactly ``nn.Sigmoid``, or tensors the op does not
take as the formula would (the formula broadcasts and promotes dtypes; the op
needs one shape and one dtype).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ._guard import _class_blocker, act_blocker, context_blocker, input_blocker
from ._registry import Family, Pattern, register


def gate_act_blocker(gate_act: nn.Module) -> Optional[str]:
    """Whether ``gate_act`` may be computed inside the op: exactly nn.Sigmoid, unobserved."""
    if type(gate_act) is not nn.Sigmoid:
        return _class_blocker(gate_act, nn.Sigmoid)
    return act_blocker(gate_act)


def _tensor_blocker(h: Tensor, gate: Tensor, x: Tensor) -> Optional[str]:
    reason = input_blocker(x, None, h) or input_blocker(x, None, gate)
    if reason is None and not (h.dtype == gate.dtype == x.dtype):
        return "the transform, gate and input dtypes differ"
    if reason is None and not (h.shape == gate.shape == x.shape):
        return "the transform, gate and input shapes differ"
    return reason


def highway_layer_forward(layer: nn.Module, x: Tensor) -> Tensor:
    h = layer.transform(x)
    gate = layer.gate(x)
    if (context_blocker() or gate_act_blocker(layer.gate_act)
            or _tensor_blocker(h, gate, x)) is None:
        return ops.highway_gate(h, gate, x)
    t = layer.gate_act(gate)
    return h * t + x * (1 - t)


def _patterns(layer: nn.Module) -> list:
    return [Pattern(None, None, ("gate_act", layer.gate_act), op="highway_gate",
                    act_blocker=gate_act_blocker)]


register("convkernels.models.highway.HighwayLayer",
         Family("highway.HighwayLayer", highway_layer_forward, _patterns))
