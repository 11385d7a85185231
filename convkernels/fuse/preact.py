"""Pre-activation ResNet (``models.preact_resnet``): the units and the model's
final BN -> ReLU.

A unit's first BN -> ReLU -> conv is one ``bn_act_conv`` where the shortcut is
the identity; with a projection shortcut the pre-activated input feeds both
convs, so BN -> ReLU runs as one ``bn_act`` and the two convs as themselves, in
the modules' order (shortcut first). Every later BN -> ReLU -> conv is one
``bn_act_conv``. The join is a plain add (nothing follows it to fuse), or with
stochastic depth ``add_act`` with the unit's per-sample mask as its scale;
the mask is ``fuse.resnet.drop_scale``'s, drawn at the unit's start as the
modules' own forward draws it. Each part falls back to its modules on its own
(the call-time checks of ``_guard``).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ._guard import context_blocker, input_blocker
from ._parts import bn_act, bn_act_conv
from ._registry import Family, Pattern, register
from .resnet import drop_scale

_MODELS = "convkernels.models.preact_resnet."


def _first(unit: nn.Module, x: Tensor):
    """(conv1's output, shortcut)."""
    if unit.downsample is None:
        return bn_act_conv(x, unit.bn1, unit.relu, unit.conv1), x
    out = bn_act(x, unit.bn1, unit.relu)
    shortcut = unit.downsample(out)
    return unit.conv1(out), shortcut


def _join(branch: Tensor, shortcut: Tensor, scale: Optional[Tensor]) -> Tensor:
    if scale is None:
        return branch + shortcut
    if context_blocker() is None and input_blocker(branch, None, shortcut) is None:
        return ops.add_act(branch, shortcut, "identity", scale)
    return branch * scale.view(-1, 1, 1, 1).to(branch.dtype) + shortcut


def basic_forward(unit: nn.Module, x: Tensor) -> Tensor:
    scale = drop_scale(unit, x)
    out, shortcut = _first(unit, x)
    out = bn_act_conv(out, unit.bn2, unit.relu, unit.conv2)
    return _join(out, shortcut, scale)


def bottleneck_forward(unit: nn.Module, x: Tensor) -> Tensor:
    scale = drop_scale(unit, x)
    out, shortcut = _first(unit, x)
    out = bn_act_conv(out, unit.bn2, unit.relu, unit.conv2)
    out = bn_act_conv(out, unit.bn3, unit.relu, unit.conv3)
    return _join(out, shortcut, scale)


def model_forward(model: nn.Module, x: Tensor) -> Tensor:
    x = model.maxpool(model.conv1(x))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    x = bn_act(x, model.norm, model.relu)
    return model.fc(model.avgpool(x).flatten(1))


def _unit(unit: nn.Module, i: int, with_conv: bool = True) -> Pattern:
    """BN_i -> ReLU [-> conv_i] (the conv follows the act)."""
    conv = (f"conv{i}", getattr(unit, f"conv{i}")) if with_conv else None
    return Pattern(conv, (f"bn{i}", getattr(unit, f"bn{i}")), ("relu", unit.relu))


def _unit_patterns(unit: nn.Module) -> list:
    n = 3 if hasattr(unit, "conv3") else 2
    return [_unit(unit, 1, unit.downsample is None)] + [_unit(unit, i) for i in range(2, n + 1)]


def _model_patterns(model: nn.Module) -> list:
    return [Pattern(None, ("norm", model.norm), ("relu", model.relu))]


register(_MODELS + "PreActBasicBlock", Family("preact.BasicBlock", basic_forward, _unit_patterns))
register(_MODELS + "PreActBottleneck", Family("preact.Bottleneck", bottleneck_forward,
                                              _unit_patterns))
register(_MODELS + "PreActResNet", Family("preact.head", model_forward, _model_patterns))
