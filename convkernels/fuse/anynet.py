"""AnyNet's ResNeXt block (``models.anynet``): conv1 -> bn1 -> ReLU and conv2 ->
bn2 -> ReLU as one ``conv_bn_act`` each, the projection conv4 -> bn4 as one (act
identity), and conv3 -> bn3 + shortcut -> ReLU as one with the shortcut as its
residual.

The fused join needs the shortcut before conv3; the block computes it after
bn3. The order shows only through hooks on conv3, bn3 or the ReLU (or global
ones), and then the part falls back in the block's own order.
"""
from __future__ import annotations

from torch import Tensor, nn

from ._guard import part_blocker
from ._parts import conv_bn_act
from ._registry import Family, Pattern, register


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    return x if block.conv4 is None else conv_bn_act(x, block.conv4, block.bn4, None)


def resnext_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    y = conv_bn_act(x, block.conv1, block.bn1, block.relu)
    y = conv_bn_act(y, block.conv2, block.bn2, block.relu)
    if part_blocker(block.conv3, block.bn3, block.relu) is None:
        return conv_bn_act(y, block.conv3, block.bn3, block.relu, _shortcut(block, x))
    y = block.bn3(block.conv3(y))
    return block.relu(y + _shortcut(block, x))


def _patterns(block: nn.Module) -> list:
    named = lambda *names: [(n, getattr(block, n)) for n in names]  # noqa: E731
    patterns = [Pattern(*named("conv1", "bn1", "relu")), Pattern(*named("conv2", "bn2", "relu"))]
    if block.conv4 is not None:
        patterns.append(Pattern(*named("conv4", "bn4"), None))
    return patterns + [Pattern(*named("conv3", "bn3", "relu"), residual=True)]


register("convkernels.models.anynet.ResNeXtBlock",
         Family("anynet.ResNeXtBlock", resnext_block_forward, _patterns))
