"""torchvision's VGG top level (the ``_bn`` variants): in eval, torchvision's
own forward on the input made channels_last on CPU when ``features`` starts
with a conv -> BN -> act that runs fused (``fuse.layout``). ``features`` is a
Sequential, which fuses its own conv -> BN -> ReLU runs; the classifier gets
``torch.flatten`` of the pooled map, the same values in either layout.

Measured on vgg16_bn, 2-core AMD EPYC (AVX2), eval batch 1, one run of
bench_models: convkernels on the caller's NCHW input 0.93x torchvision eager,
torchvision's own channels_last 1.17x; with it, 1.28x (batch 8: 1.37x). Training
keeps the caller's layout: in one run a batch-16 training step was 0.91x
for torchvision's own channels_last and 0.88x for this trunk layout (on the
caller's NCHW input, 1.03x in a later run). The VGGs
without BN and AlexNet keep the caller's layout: not measured.

A hook on ``features`` (or a forward set on it) would see the converted input,
so then the caller's tensor goes in, as it does where the first conv -> BN ->
act would not run fused (a hook on one of them, a tracer, an input the ops do
not take, the reference backend). Nothing here imports torchvision.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ._bind import bound
from ._guard import ACTS, observed
from ._registry import Family, Pattern, register
from .layout import cpu_trunk_layout
from .sequential import _is_bn


def _stem(model: nn.Module) -> Optional[list]:
    """``[(name, module)]`` of ``features``' first conv, BN and act (names from
    the top level), when ``features`` is a Sequential that starts so."""
    features = model._modules.get("features")
    if type(features) is not nn.Sequential:
        return None
    first = list(features._modules.items())[:3]
    if (len(first) < 3 or type(first[0][1]) is not nn.Conv2d or not _is_bn(first[1][1])
            or type(first[2][1]) not in ACTS):
        return None
    return [(f"features.{name}", m) for name, m in first]


def vgg_forward(model: nn.Module, x: Tensor) -> Tensor:
    """torchvision's forward, in eval on the input of ``features``."""
    stem, features = _stem(model), model._modules.get("features")
    if (not model.training and stem is not None and bound(features) is not None
            and observed(features) is None):
        x = cpu_trunk_layout(x, *(m for _, m in stem))
    return type(model).forward(model, x)


def _patterns(model: nn.Module) -> list:
    """The stem the layout follows (``features``' own forward computes it); none
    for a VGG without BN, which is then not bound."""
    stem = _stem(model)
    return [] if stem is None else [Pattern(*stem)]


register("torchvision.models.vgg.VGG", Family("vgg.VGG", vgg_forward, _patterns))
