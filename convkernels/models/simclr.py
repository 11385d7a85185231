"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
Visual Representations"): a base encoder f whose classifier is removed, so that
h = f(x) is the representation after average pooling, and the projection head
g, an MLP with one hidden layer: z = W2 ReLU(W1 h). The contrastive (NT-Xent)
loss is applied to z of two augmented views; it is not part of the model.

The encoder is any ``convkernels.models`` builder (by name or as a callable),
fused as that builder fuses it. The head has no BatchNorm: nothing in it is
fused (no op computes linear -> ReLU).
"""
from __future__ import annotations

from typing import Callable, Union

from torch import Tensor, nn

__all__ = ["SimCLR", "simclr"]


class SimCLR(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int, projection_dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                                       nn.Linear(feature_dim, projection_dim))

    def forward(self, x: Tensor) -> Tensor:
        """z = g(f(x)); ``model.encoder(x)`` gives the representation h."""
        return self.projector(self.encoder(x))


def _remove_classifier(model: nn.Module) -> int:
    """Replaces the model's classifier (``fc``, or ``classifier``: a Linear, or a
    Sequential of dropout and Linear) with Identity; returns the feature size."""
    for name in ("fc", "classifier"):
        head = getattr(model, name, None)
        linears = [m for m in head.modules() if type(m) is nn.Linear] if head is not None else []
        if linears:
            setattr(model, name, nn.Identity())
            return linears[0].in_features
    raise ValueError(f"simclr: {type(model).__name__} has no fc or classifier to remove")


def simclr(encoder: Union[str, Callable[..., nn.Module]] = "resnet50", projection_dim: int = 128,
           **encoder_kwargs) -> SimCLR:
    """SimCLR on ``convkernels.models.<encoder>(**encoder_kwargs)``; the hidden
    layer of the head is as wide as the representation, as in the paper."""
    if isinstance(encoder, str):
        from .. import models

        encoder = getattr(models, encoder)
    net = encoder(**encoder_kwargs)
    return SimCLR(net, _remove_classifier(net), projection_dim)
