"""The architecture set on the fused ops (torchvision-compatible builders)."""
from .densenet import DenseNet, densenet121, densenet161, densenet169, densenet201

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201"]
