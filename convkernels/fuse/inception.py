"""torchvision's GoogLeNet and Inception v3 family: ``BasicConv2d`` (conv -> BN
(eps 0.001) -> F.relu) and the Inception blocks (GoogLeNet's ``Inception``,
Inception v3's ``InceptionA`` to ``InceptionE``).

* ``BasicConv2d``: one ``conv_bn_act`` (act relu).
* Inception blocks: no ``torch.cat``. The block allocates its output once and
  each branch's last BasicConv2d writes its channel slice directly
  (``conv_bn_act``'s ``out=``); InceptionE's inner forks (1x3 and 3x1 convs)
  write two neighbouring slices; a pooling-only branch is copied into its
  slice. The branches run in torchvision's order, so hooks fire in its order.
  The fallback rule holds per branch: a branch whose head is observed (a hook
  on it or on its conv or BN, a replaced class) runs its modules and its
  result is copied into the slice; the other branches stay fused. A result
  that does not fit its slice (a hook returned another shape or dtype) makes
  the block concatenate what it has, as torchvision does. Under torch.compile
  the block concatenates too: Dynamo takes no out= that is not contiguous,
  and inductor places the branches' results in the output itself.

The top-level models, their aux classifiers and transform_input are
torchvision's own forwards: they only call BasicConv2d and the blocks.
Bound on GoogLeNet and Inception3, they run on the input made channels_last on
CPU when the stem BasicConv2d runs fused (``fuse.layout``; googlenet on a 2-core
EPYC, eval batch 1: 0.86x -> 2.0x torchvision).
Nothing here imports torchvision: the classes are registered by path.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _autocast
from ..ops._checks import conv_output_size
from ..ops._library import memory_format
from ._bind import bound
from ._guard import blocker, context_blocker, input_blocker, observed, part_blocker
from ._parts import run_conv_bn_act
from ._registry import Family, Pattern, family_of, register
from .layout import cpu_trunk_layout

_GOOGLENET = "torchvision.models.googlenet."
_INCEPTION = "torchvision.models.inception."


# ------------------------------------------------------------------ BasicConv2d
def _basic(m: nn.Module, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``F.relu(m.bn(m.conv(x)), inplace=True)``, into ``out`` when the fused op
    runs (the caller fills ``out`` from the unfused result)."""
    if blocker(x, m.conv, m.bn, None) is None:
        return run_conv_bn_act(x, m.conv, m.bn, "relu", out=out)
    return F.relu(m.bn(m.conv(x)), inplace=True)


def basic_conv_forward(m: nn.Module, x: Tensor) -> Tensor:
    return _basic(m, x)


def _basic_patterns(m: nn.Module) -> list:
    # act None: the activation is F.relu, no module (the report shows 'identity').
    return [Pattern(("conv", m.conv), ("bn", m.bn), None)]


# ---------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class Branch:
    """One branch of a block: ``stem`` runs in order on the block input (child
    names or pooling functions), then each of ``heads`` (child names) on the
    stem's result fills the next channel slice; without heads the stem's result
    (a pooling of the input) fills one."""
    stem: tuple
    heads: tuple = ()


_AVG = partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1)
_MAX = partial(F.max_pool2d, kernel_size=3, stride=2)

# torchvision's _forward of each class, as branches.
_BRANCHES = {
    "Inception": (Branch((), ("branch1",)), Branch((), ("branch2",)), Branch((), ("branch3",)),
                  Branch((), ("branch4",))),
    "InceptionA": (Branch((), ("branch1x1",)), Branch(("branch5x5_1",), ("branch5x5_2",)),
                   Branch(("branch3x3dbl_1", "branch3x3dbl_2"), ("branch3x3dbl_3",)),
                   Branch((_AVG,), ("branch_pool",))),
    "InceptionB": (Branch((), ("branch3x3",)),
                   Branch(("branch3x3dbl_1", "branch3x3dbl_2"), ("branch3x3dbl_3",)),
                   Branch((_MAX,))),
    "InceptionC": (Branch((), ("branch1x1",)),
                   Branch(("branch7x7_1", "branch7x7_2"), ("branch7x7_3",)),
                   Branch(("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4"),
                          ("branch7x7dbl_5",)),
                   Branch((_AVG,), ("branch_pool",))),
    "InceptionD": (Branch(("branch3x3_1",), ("branch3x3_2",)),
                   Branch(("branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3"), ("branch7x7x3_4",)),
                   Branch((_MAX,))),
    "InceptionE": (Branch((), ("branch1x1",)),
                   Branch(("branch3x3_1",), ("branch3x3_2a", "branch3x3_2b")),
                   Branch(("branch3x3dbl_1", "branch3x3dbl_2"), ("branch3x3dbl_3a", "branch3x3dbl_3b")),
                   Branch((_AVG,), ("branch_pool",))),
}


def _fusable_basic(m: nn.Module) -> bool:
    """``m`` is a BasicConv2d whose forward is this family's, nothing observes it
    and its conv and BN may fuse: it may run here, into a slice."""
    f = bound(m)
    return (f is not None and f.fn is basic_conv_forward and observed(m) is None
            and part_blocker(m.conv, m.bn, None) is None)


def _unrolled(head: nn.Module) -> tuple:
    """(stem modules, head module): GoogLeNet's branches are Sequentials ending in
    a BasicConv2d; a plain one is run child by child, so that its last
    BasicConv2d writes the slice. Anything else is one opaque head."""
    if type(head) is nn.Sequential and observed(head) is None and len(head) > 0:
        mods = list(head._modules.values())
        return tuple(mods[:-1]), mods[-1]
    return (), head


def _width(head: nn.Module) -> Optional[int]:
    """The channels ``head`` produces, known before it runs, or None."""
    if type(head) is nn.Sequential and len(head) > 0:
        return _width(head[len(head) - 1])
    conv = getattr(head, "conv", None)
    return conv.out_channels if type(conv) is nn.Conv2d else None


def _plan(block: nn.Module, x: Tensor) -> Optional[list]:
    """[(stem callables, [(head module or None, channels)])] in torchvision's
    order, or None where a width is unknown (a replaced branch)."""
    plan = []
    for br in _BRANCHES[type(block).__name__]:
        stem = [block._modules[s] if isinstance(s, str) else s for s in br.stem]
        heads = []
        for name in br.heads:
            pre, head = _unrolled(block._modules[name])
            width = _width(head)
            if width is None:
                return None
            stem += pre  # only GoogLeNet's branches unroll, each has one head
            heads.append((head, width))
        plan.append((stem, heads or [(None, x.size(1))]))
    return plan


def _out_dtype(x: Tensor) -> torch.dtype:
    """The dtype a conv on x produces: autocast's where it casts x."""
    low = _autocast.dtype(x)
    return x.dtype if low is None or x.dtype == torch.float64 else low


def _conv_out(head: nn.Module, y: Tensor) -> tuple:
    """(dtype, H, W) of ``head.conv(y)``."""
    c = head.conv
    return (_out_dtype(y), *conv_output_size("inception", y, c.weight, list(c.stride),
                                             list(c.padding), list(c.dilation)))


def _fill(dst: Tensor, y: Tensor) -> tuple:
    """(``dst`` holding ``y``, True), or ``(y, False)`` where y does not fit."""
    if y is dst:
        return dst, True
    if y.shape != dst.shape or y.dtype != dst.dtype or y.device != dst.device:
        return y, False
    return dst.copy_(y), True


def inception_forward(block: nn.Module, x: Tensor) -> Tensor:
    plan = None
    if context_blocker() is None and input_blocker(x, None) is None:
        plan = _plan(block, x)
    if plan is None:  # torchvision's forward (its BasicConv2d still fused)
        return type(block).forward(block, x)
    channels = sum(w for _, heads in plan for _, w in heads)
    into_slices = not torch.compiler.is_compiling()  # see the module docstring
    buf, offset, parts, whole = None, 0, [], into_slices
    for stem, heads in plan:
        y = x
        for s in stem:
            y = s(y)
        for head, width in heads:
            fused = head is not None and _fusable_basic(head)
            z = None if fused else y if head is None else head(y)
            if not into_slices:
                parts.append(_basic(head, y) if fused else z)
                continue
            if buf is None:  # the output's size is known from the first head on
                dtype, *hw = (z.dtype, *z.shape[2:]) if z is not None else _conv_out(head, y)
                buf = torch.empty((x.size(0), channels, *hw), dtype=dtype, device=x.device,
                                  memory_format=memory_format(x))
            dst = buf[:, offset:offset + width]
            offset += width
            if fused:
                fits = _conv_out(head, y) == (dst.dtype, *dst.shape[2:])
                z = _basic(head, y, dst if fits else None)
            part, filled = _fill(dst, z)
            parts.append(part)
            whole = whole and filled
    # A result that did not fit its slice: torchvision's cat of what there is.
    return buf if whole else torch.cat(parts, 1)


def _block_patterns(block: nn.Module) -> list:
    """The heads' parts, which this forward computes into its slices (they show
    under their own BasicConv2d too)."""
    return [Pattern((f"{name}.conv", m.conv), (f"{name}.bn", m.bn), None)
            for name, m in _heads(block)]


def _heads(block: nn.Module) -> list:
    """(name relative to block, BasicConv2d) of each head, as torchvision built it."""
    out = []
    for br in _BRANCHES[type(block).__name__]:
        for name in br.heads:
            m = block._modules[name]
            if type(m) is nn.Sequential and len(m) > 0:
                name, m = f"{name}.{len(m) - 1}", m[len(m) - 1]
            if type(getattr(m, "conv", None)) is nn.Conv2d and hasattr(m, "bn"):
                out.append((name, m))
    return out


# ------------------------------------------------------------------ top levels
def _trunk_input(x, stem: Optional[nn.Module]):
    """``x`` channels_last on CPU (``fuse.layout``) when ``stem``, the first
    BasicConv2d, runs fused and unobserved (a hook on it would get the converted
    x). transform_input, if set, works on either layout."""
    if stem is None or not _fusable_basic(stem):
        return x
    return cpu_trunk_layout(x, stem.conv, stem.bn, None)


def googlenet_forward(model: nn.Module, x: Tensor):
    """torchvision's forward on the input of the stem ``conv1``."""
    return type(model).forward(model, _trunk_input(x, model._modules.get("conv1")))


def inception3_forward(model: nn.Module, x: Tensor):
    """torchvision's forward on the input of the stem ``Conv2d_1a_3x3``."""
    return type(model).forward(model, _trunk_input(x, model._modules.get("Conv2d_1a_3x3")))


def _top_patterns(model: nn.Module, stem: str) -> list:
    """The stem's part, named from the top level: the part the layout follows
    (the stem's own forward computes it)."""
    m = model._modules.get(stem)
    family = family_of(m)
    if family is None or family.forward is not basic_conv_forward:
        return []
    return [Pattern((f"{stem}.conv", m.conv), (f"{stem}.bn", m.bn), None)]


register(_GOOGLENET + "BasicConv2d", Family("googlenet.BasicConv2d", basic_conv_forward,
                                            _basic_patterns))
register(_INCEPTION + "BasicConv2d", Family("inception.BasicConv2d", basic_conv_forward,
                                            _basic_patterns))
register(_GOOGLENET + "Inception", Family("googlenet.Inception", inception_forward,
                                          _block_patterns))
for _name in ("InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE"):
    register(_INCEPTION + _name, Family(f"inception.{_name}", inception_forward, _block_patterns))
register(_GOOGLENET + "GoogLeNet", Family("googlenet.GoogLeNet", googlenet_forward,
                                          partial(_top_patterns, stem="conv1")))
register(_INCEPTION + "Inception3", Family("inception.Inception3", inception3_forward,
                                           partial(_top_patterns, stem="Conv2d_1a_3x3")))
