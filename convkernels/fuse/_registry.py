"""The fusion registry: a module class -> the family that fuses its forward.

Classes are registered by import path, so registering torchvision's classes
imports nothing: a model holding one has imported it already. Matching is by
exact class (the class found at that path), never by isinstance: a subclass may
compute something else.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

Named = tuple  # (name relative to the bound module, module)


@dataclass(frozen=True)
class Pattern:
    """One part a fused forward computes: ``[conv ->] [bn ->] [act] [+ residual]``,
    each a ``Named`` submodule (or None), for the report; a conv or a bn at least
    (without bn: conv_act), or an ``op`` of another kind named as such (its
    ``act`` the module it computes, e.g. highway_gate's sigmoid)."""
    conv: Optional[Named]
    bn: Optional[Named]
    act: Optional[Named]
    residual: bool = False
    bn_class: type = nn.BatchNorm2d  # the BatchNorm class the part computes
    op: str = ""  # the op's name where it is none of conv_act, bn_act, conv_bn_act
    # the act module's call-time check where it is not _guard.act_blocker (an op
    # that computes one act class only)
    act_blocker: Optional[Callable] = None


@dataclass(frozen=True)
class Family:
    name: str  # shown in the report, e.g. "resnet.BasicBlock"
    # forward(module, *args): the fused forward; a module-level function, so
    # that a bound one pickles by name.
    forward: Callable
    # patterns(module) -> [Pattern]: the parts forward would fuse in module now;
    # none means there is nothing to bind.
    patterns: Callable


FAMILIES: dict[str, Family] = {}


def register(class_path: str, family: Family) -> None:
    FAMILIES[class_path] = family


def family_of(module: nn.Module) -> Optional[Family]:
    cls = type(module)
    family = FAMILIES.get(f"{cls.__module__}.{cls.__qualname__}")
    if family is None or getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is not cls:
        return None
    return family
