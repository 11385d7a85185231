"""The torch.library fragment of the ``convkernels`` namespace and layout helpers
shared by the ops."""
from __future__ import annotations

from typing import Optional

import torch

LIB = torch.library.Library("convkernels", "FRAGMENT")


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The dense format the kernels run ``x`` in: channels_last if x is laid out
    that way (even with gaps), else NCHW."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or (
        x.dim() == 4 and x.suggest_memory_format() == torch.channels_last
    ):
        return torch.channels_last
    return torch.contiguous_format


def dense(t: Optional[torch.Tensor], fmt: torch.memory_format) -> Optional[torch.Tensor]:
    """``t`` dense in ``fmt`` (no copy when it already is)."""
    return None if t is None else t.contiguous(memory_format=fmt)
