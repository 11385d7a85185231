"""scikit-learn's bundled digits (1,797 8x8 images, no download), upsampled to
the image size a model expects, and a seeded training loop. Shared by
``train_digits.py`` and ``tests/test_convergence.py``."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def digits(size: int, test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): [N, 1, size, size] float32 in [0, 1],
    bilinearly upsampled from 8x8, split by a seeded permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def batches(n: int, batch_size: int, steps: int, seed: int = 0):
    """``steps`` index batches, reshuffled every epoch by a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=g).split(batch_size):
            if done == steps:
                return
            if len(idx) == batch_size:  # equal batches: BatchNorm never sees a tiny one
                yield idx
                done += 1


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int = 64,
          lr: float = 0.01, seed: int = 0,
          on_step: Optional[Callable[[int, float], None]] = None) -> list:
    """Adam on the cross-entropy, the batches and dropout/stochastic-depth masks
    fixed by ``seed``; returns the loss of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for step, idx in enumerate(batches(len(y), batch_size, steps, seed)):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()
