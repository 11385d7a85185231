"""Train LeNet on scikit-learn's bundled digits with the fused ops, and the
plain-torch reference from the same weights on the same batches, and plot
both loss curves.

    python examples/train_digits.py                  # lenet_bn, about a minute on 2 CPU cores
    python examples/train_digits.py --model lenet    # the seeds' sigmoid LeNet (nothing in it is fused)

Writes the figure to --out (default examples/digits_loss.png) and prints its path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import digits  # noqa: E402
from convkernels import models  # noqa: E402
from reference import lenet as ref_lenet  # noqa: E402  (tests/reference: plain torch)

REFERENCES = {"lenet": ref_lenet.LeNet, "lenet_bn": lambda: ref_lenet.LeNet(batch_norm=True)}


def progress(total: int, desc: str):
    """tqdm if installed, else a one-line text bar; returns on_step(step, loss)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=desc)

        def on_step(step, loss):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step + 1 == total:
                bar.close()
        return on_step

    def on_step(step, loss):
        done = (step + 1) * 30 // total
        end = "\n" if step + 1 == total else ""
        print(f"\r{desc} [{'#' * done}{'.' * (30 - done)}] {step + 1}/{total} loss {loss:.3f}",
              end=end, flush=True)
    return on_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(REFERENCES), default="lenet_bn")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "digits_loss.png")
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = digits.digits(28)
    torch.manual_seed(0)
    model = getattr(models, args.model)()
    reference = REFERENCES[args.model]()
    reference.load_state_dict(model.state_dict(), strict=True)

    curves = {}
    for label, net in (("convkernels (fused)", model), ("reference (plain torch)", reference)):
        start = time.perf_counter()
        curves[label] = digits.train(net, x_train, y_train, args.steps, args.batch_size,
                                     on_step=progress(args.steps, label))
        print(f"{label}: {time.perf_counter() - start:.1f} s, test accuracy "
              f"{digits.accuracy(net, x_test, y_test):.1%}")
    (fused, ref) = curves.values()
    print(f"largest loss difference over {args.steps} steps: "
          f"{max(abs(a - b) for a, b in zip(fused, ref)):.2e}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, losses), style in zip(curves.items(), ("-", "--")):
        ax.plot(losses, style, label=label, linewidth=1.2)
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title=f"{args.model} on sklearn digits: fused vs reference")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"loss curves: {args.out}")


if __name__ == "__main__":
    main()
