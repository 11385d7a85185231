"""bn_act benchmark: BN + ReLU and BN + residual + ReLU.

Variants: ``eager`` (``F.relu(F.batch_norm(...) [+ r])``), ``compile``
(torch.compile of that same eager function, compiled once per shape / layout /
dtype / op / mode) and ``convkernels-<backend>`` (``convkernels.ops.bn_act``).

Cases: every shape x layout (nchw, cl) x dtype x op (bn_relu, bn_add_relu) x
{train fwd, train fwd+bwd, eval fwd}. Train updates the running stats (the
same in every variant). "train fwd" runs with autograd recording (the forward
of a training step); eval runs under no_grad. fwd+bwd takes autograd.grad of
the output w.r.t. x, weight, bias (and residual) with a fixed grad_y.

Ideal bytes (GB/s = bytes / median time), E = element size, M = N*C*H*W:
  fwd      read x (+ r) once, write y once           -> (2 [+1]) * M * E
  bwd      read grad_y, x (+ r), write grad_x (+ grad_r) -> (3 [+2]) * M * E
  fwd+bwd  the sum                                     -> (5 [+3]) * M * E
(per-channel vectors are ignored). Run ``--help`` for the options.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import timing  # noqa: E402

BENCH = "bn_act"
EPS, MOMENTUM = 1e-5, 0.1
MODES = [("train", "fwd"), ("train", "fwd+bwd"), ("eval", "fwd")]
OPS = ["bn_relu", "bn_add_relu"]


def _eager(training, res):
    """``relu(batch_norm(x) [+ residual])`` with batch (train) or running (eval) stats."""
    def eager(inp):
        z = F.batch_norm(inp["x"], inp["running_mean"], inp["running_var"], inp["weight"],
                         inp["bias"], training, MOMENTUM, EPS)
        return F.relu(z + inp["residual"] if res else z)
    eager.__name__ = f"eager_{'train' if training else 'eval'}{'_res' if res else ''}"
    return eager


def _fused(training):
    def fused(inp):
        return common.ck.ops.bn_act(inp["x"], inp["running_mean"], inp["running_var"],
                                    inp["weight"], inp["bias"], training, MOMENTUM, EPS,
                                    "relu", inp.get("residual"))
    return fused


EAGER = {(mode, res): _eager(mode == "train", res) for mode in ("train", "eval")
         for res in (False, True)}
FUSED = {"train": _fused(True), "eval": _fused(False)}


def make_base(shape, layout, dtype, device) -> dict:
    """The random tensors of one (shape, layout, dtype), cloned by each case."""
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    vec = lambda s, m: (torch.randn(c, generator=g) * s + m).to(device)  # noqa: E731
    return dict(
        x=common.randn(shape, dtype, device, layout, scale=2.0, shift=0.5, gen=g),
        residual=common.randn(shape, dtype, device, layout, gen=g),
        grad_y=common.randn(shape, dtype, device, layout, gen=g),
        weight=vec(0.1, 1.0), bias=vec(0.1, 0.0),
        running_mean=vec(0.1, 0.5), running_var=(torch.rand(c, generator=g) + 3.5).to(device),
    )


def build_cases(args, device) -> list:
    cases = []
    for shape, numel, layout, dtype, base in common.shape_grid(args, device, make_base):
        for op in OPS:
            res = op == "bn_add_relu"
            for mode, direction in MODES:
                train = mode == "train"
                diff = ("x", "weight", "bias") + (("residual",) if res else ())
                names = ["x", "weight", "bias", "running_mean", "running_var", "grad_y"] + (
                    ["residual"] if res else [])

                grads = diff if direction == "fwd+bwd" or (train and direction == "fwd") else ()

                def make_inputs(base=base, names=names, grads=grads):
                    return common.clone_inputs(base(), names, grads)

                e = timing.DTYPE_NAMES[dtype]
                esize = torch.empty((), dtype=dtype).element_size()
                fwd_b = (3 if res else 2) * numel * esize
                bwd_b = (5 if res else 3) * numel * esize
                nbytes = fwd_b + (bwd_b if direction == "fwd+bwd" else 0)
                case = "/".join([timing.shape_str(shape), layout, e, op, mode, direction])
                cases.append(common.Case(
                    bench=BENCH, case=case, make_inputs=make_inputs,
                    eager=EAGER[(mode, res)], fused=FUSED[mode],
                    direction=direction, grad_mode=train, nbytes=nbytes, dtype=dtype,
                    diff=diff, state=("running_mean", "running_var") if train else (),
                    compile_key=(shape, layout, dtype, op, mode),
                    note="bytes: fwd R(x" + (",r" if res else "") + ")+W(y)"
                         + ("; bwd R(gy,x" + (",r" if res else "") + ")+W(gx"
                            + (",gr" if res else "") + ")" if direction == "fwd+bwd" else ""),
                ))
    return cases


def main(argv=None) -> list:
    return common.bench_main(__doc__.splitlines()[0], BENCH, build_cases, argv)


if __name__ == "__main__":
    main()
