"""Modules built on the fused ops; parameters live in ordinary torch submodules."""
from .batchnorm_act import BatchNormAct2d

__all__ = ["BatchNormAct2d"]
