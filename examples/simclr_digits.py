"""SimCLR pretraining on scikit-learn's digits, then a linear probe.

    python examples/simclr_digits.py [--steps 150]

The encoder is a small pre-activation ResNet-18 (fused ops), the loss NT-Xent
on two augmented views (random shifts and pixel noise) of each image:
``convkernels.ops.nt_xent_loss`` where this convkernels has it, else the eager
formula below. The probe: logistic regression on the frozen representation h.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import digits  # noqa: E402
from train_digits import progress  # noqa: E402
from convkernels import models, ops  # noqa: E402


def eager_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Chen et al. 2020's NT-Xent: cross-entropy of each of the 2N views against
    its pair, over the cosine similarities / temperature to every other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = z @ z.t() / temperature
    s.fill_diagonal_(float("-inf"))
    n = z1.size(0)
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(s, pair)


NT_XENT = getattr(ops, "nt_xent_loss", eager_nt_xent)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random shift of up to 3 pixels (zero fill) and Gaussian pixel noise."""
    n, _, h, w = x.shape
    padded = F.pad(x, (3, 3, 3, 3))
    dy, dx = torch.randint(0, 7, (2,), generator=g).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w] + 0.1 * torch.randn(x.shape, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.5)
    args = parser.parse_args()
    print("NT-Xent:", "convkernels.ops.nt_xent_loss" if NT_XENT is not eager_nt_xent
          else "eager (this convkernels has no ops.nt_xent_loss)")

    x_train, y_train, x_test, y_test = digits.digits(32)
    torch.manual_seed(0)
    model = models.simclr("preact_resnet18", 32, in_channels=1, num_classes=10, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    on_step = progress(args.steps, "SimCLR")
    model.train()
    for step, idx in enumerate(digits.batches(len(y_train), args.batch_size, args.steps)):
        x = x_train[idx]
        loss = NT_XENT(model(augment(x, g)), model(augment(x, g)), args.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        on_step(step, loss.item())

    from sklearn.linear_model import LogisticRegression

    model.eval()
    with torch.no_grad():
        h_train, h_test = model.encoder(x_train).numpy(), model.encoder(x_test).numpy()
    probe = LogisticRegression(max_iter=2000).fit(h_train, y_train.numpy())
    print(f"linear probe on the frozen representation: {probe.score(h_test, y_test.numpy()):.1%} "
          "test accuracy")


if __name__ == "__main__":
    main()
