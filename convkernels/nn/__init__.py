"""Modules built on the fused ops; parameters live in ordinary torch submodules."""
from .batchnorm_act import BatchNormAct2d
from .conv_bn_act import BNActConv2d, ConvBNAct2d
from .sync_batchnorm import SyncBatchNormAct2d, convert_sync_batchnorm

__all__ = ["BNActConv2d", "BatchNormAct2d", "ConvBNAct2d", "SyncBatchNormAct2d",
           "convert_sync_batchnorm"]
