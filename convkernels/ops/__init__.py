"""Fused ops, registered as ``torch.ops.convkernels.*`` with autograd.

Each op is computed by the backend chosen in :mod:`convkernels.backend`;
:mod:`convkernels.ops.reference` holds the aten definition of each.
"""
from . import reference
from .add_act import add_act
from .batch_stats import batch_stats
from .bn_act import bn_act
from .bn_act_conv import bn_act_conv
from .conv_act import conv_act
from .conv_bn_act import conv_bn_act
from .highway_gate import highway_gate
from .nt_xent import nt_xent_loss

__all__ = ["add_act", "batch_stats", "bn_act", "bn_act_conv", "conv_act", "conv_bn_act", "highway_gate", "nt_xent_loss", "reference"]
