"""What ``optimize`` fused and what it left, with module names and reasons."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import _guard
from ._bind import bound
from ._registry import Pattern, family_of


@dataclass(frozen=True)
class Part:
    module: str   # the module whose forward computes the part ('' for the root)
    op: str       # e.g. "conv_bn_act(act='relu', residual)"; '-' where nothing is fused
    covers: tuple  # qualified names of the modules the part computes
    fused: bool   # whether the part runs fused now (the call-time check, less the input)
    reason: str   # why not, '' when fused
    family: str = ""  # the family whose forward computes it ('' where none does)


class Report(list):
    """A list of ``Part``; ``str()`` gives a table."""

    @property
    def fused(self) -> list:
        return [p for p in self if p.fused]

    @property
    def left(self) -> list:
        return [p for p in self if not p.fused]

    def __str__(self) -> str:
        lines = [f"{len(self.fused)} fused parts, {len(self.left)} left"]
        for p in self:
            state = "fused" if p.fused else "left "
            lines.append(f"{state}  {p.op:<34} {' + '.join(p.covers)}"
                         + (f"  ({p.reason})" if p.reason else ""))
        return "\n".join(lines)


def _qualify(prefix: str, name: str) -> str:
    """``name`` ('' for the bound module itself) under the bound module ``prefix``."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _op(p: Pattern) -> str:
    if p.op:
        return p.op
    act = "identity" if p.act is None else _guard.ACTS.get(type(p.act[1]), type(p.act[1]).__name__)
    name = "bn_act" if p.conv is None else "conv_act" if p.bn is None else "conv_bn_act"
    return f"{name}(act={act!r}{', residual' if p.residual else ''})"


def _pattern_part(prefix: str, p: Pattern, family: str) -> Part:
    checks = ((p.conv, _guard.conv_blocker),
              (p.bn, partial(_guard.bn_blocker, expected=p.bn_class)),
              (p.act, p.act_blocker or _guard.act_blocker))
    # The bound module itself (name ''; e.g. timm's BatchNormAct2d) is its family's
    # class by construction, and its own hooks run around the fused forward.
    present = [(_qualify(prefix, named[0]), named[1], check if named[0] else lambda m: None)
               for named, check in checks if named is not None]
    # The call-time check's order: the context first, then each module.
    reason = _guard.context_blocker() or next(
        (f"{name} {why}" for name, m, check in present if (why := check(m))), "")
    return Part(prefix, _op(p), tuple(name for name, _, _ in present), not reason, reason,
                family)


def _add(report: Report, part: Part) -> None:
    """Adds the part that runs where a bound module's part covers a bound
    submodule's too (an MBConv's join and its project Conv2dNormActivation):
    the outer one when it fuses (the inner forward is not called), else the inner."""
    mine = set(part.covers)
    for i, other in enumerate(report):
        if other.module != part.module and mine <= set(other.covers):
            if other.fused:
                return
            if part.fused:
                report[i] = part
                return
    report.append(part)


def explain(model: nn.Module) -> Report:
    """Every fused part of ``model`` and every part left alone, with the reason:
    the bound forwards' parts as the call-time check sees them now (inputs
    aside), and each conv or BatchNorm no fused part covers."""
    report, covered = Report(), set()
    for name, m in model.named_modules():
        family = family_of(m)
        if bound(m) is not None:
            if family is None:
                report.append(Part(name, "-", (name,), False, "its class changed after optimize"))
                continue
            for p in family.patterns(m):
                part = _pattern_part(name, p, family.name)
                _add(report, part)
                covered.update(part.covers)
        elif family is not None and "forward" in m.__dict__:
            report.append(Part(name, "-", (name,), False,
                               "its forward is overridden on the instance"))
    for name, m in model.named_modules():
        if isinstance(m, (_ConvNd, _BatchNorm)) and name not in covered:
            why = (_guard.conv_blocker if isinstance(m, _ConvNd) else _guard.bn_blocker)(m)
            report.append(Part(name, "-", (name,), False, why or "not in a fused pattern"))
    return report
