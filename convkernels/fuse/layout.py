"""The trunk's memory layout on CPU: channels_last once the stem fuses.

oneDNN computes a CPU convolution in channels_last (nhwc) and reorders an NCHW
input and output around it; a model whose activations are channels_last skips
those reorders (resnet50, 2-core EPYC, eval batch 1: 0.77x -> 1.26x
torchvision). So a top level whose stem runs fused makes its input
channels_last before the stem, and every later module gets channels_last
tensors from the one before. Values do not depend on the layout (oneDNN's
summation order aside); random masks drawn per sample (stochastic depth) or on
[N, C] tensors (a classifier's dropout) do not either.

Where the stem would not run fused (a hook on one of its modules, a global hook,
FX, TorchScript or export tracing, an input the ops do not take) or on the
reference backend, the model gets the caller's tensor, as torchvision's does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import backend
from ._guard import blocker


def cpu_trunk_layout(x, conv: nn.Module, bn: nn.Module, act: Optional[nn.Module]):
    """``x`` channels_last when ``act(bn(conv(x)))``, the stem, runs fused on CPU
    (not the reference backend, whose aten composite gains nothing from it);
    else ``x`` itself."""
    if (blocker(x, conv, bn, act) is None and x.device.type == "cpu"
            and backend.resolve(x.device) != "reference"):
        return x.contiguous(memory_format=torch.channels_last)
    return x

