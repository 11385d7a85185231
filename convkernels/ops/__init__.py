"""Fused ops, registered as ``torch.ops.convkernels.*`` with autograd.

Each op is computed by the backend chosen in :mod:`convkernels.backend`;
:mod:`convkernels.ops.reference` holds the aten definition of each.
"""
from . import reference
from .add_act import add_act
from .bn_act import bn_act

__all__ = ["add_act", "bn_act", "reference"]
