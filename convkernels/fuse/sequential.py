"""Runs inside any ``nn.Sequential``: Conv2d -> BatchNorm2d [-> act],
BatchNorm2d -> act and Conv2d -> act (no BatchNorm: VGG, AlexNet, LeNet, NiN),
act one of ReLU / SiLU / Sigmoid / Identity (exact classes; the BatchNorm2d may
be one convert_sync_batchnorm made a SyncBatchNormAct2d). A Conv2d followed by
a BatchNorm2d is that conv's run, whatever comes after the BatchNorm2d.

The Sequential's forward runs each run as one op and every other child as
itself. Runs are found on every call, so a Sequential edited after ``optimize``
(appended, replaced, deleted children) runs what it holds now.
"""
from __future__ import annotations

from torch import nn

from ._guard import ACTS, plain_sync
from ._parts import bn_act, conv_act, conv_bn_act
from ._registry import Family, Pattern, register


def _is_bn(m: nn.Module) -> bool:
    """BatchNorm2d, or one convert_sync_batchnorm made a SyncBatchNormAct2d."""
    return type(m) is nn.BatchNorm2d or plain_sync(m)


def _runs(mods: list):
    """(start, stop) of each run in ``mods``, left to right, not overlapping."""
    i, n = 0, len(mods)
    while i + 1 < n:
        first, second = mods[i], mods[i + 1]
        if type(first) is nn.Conv2d and _is_bn(second):
            stop = i + 3 if i + 2 < n and type(mods[i + 2]) in ACTS else i + 2
        elif (_is_bn(first) or type(first) is nn.Conv2d) and type(second) in ACTS:
            stop = i + 2
        else:
            i += 1
            continue
        yield i, stop
        i = stop


def sequential_forward(seq: nn.Sequential, input):
    mods = list(seq._modules.values())
    done = 0
    for start, stop in _runs(mods):
        for m in mods[done:start]:
            input = m(input)
        run = mods[start:stop]
        if type(run[0]) is not nn.Conv2d:
            input = bn_act(input, run[0], run[1])
        elif _is_bn(run[1]):
            input = conv_bn_act(input, run[0], run[1], run[2] if len(run) == 3 else None)
        else:
            input = conv_act(input, run[0], run[1])
        done = stop
    for m in mods[done:]:
        input = m(input)
    return input


def _patterns(seq: nn.Sequential) -> list:
    items = list(seq._modules.items())
    patterns = []
    for start, stop in _runs([m for _, m in items]):
        run = items[start:stop]
        if type(run[0][1]) is not nn.Conv2d:
            patterns.append(Pattern(None, run[0], run[1]))
        elif _is_bn(run[1][1]):
            patterns.append(Pattern(run[0], run[1], run[2] if len(run) == 3 else None))
        else:
            patterns.append(Pattern(run[0], None, run[1]))
    return patterns


register("torch.nn.modules.container.Sequential",
         Family("sequential", sequential_forward, _patterns))
