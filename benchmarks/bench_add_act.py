"""add_act benchmark: the residual join ``relu(r + x)`` and its stochastic-depth
form ``relu(r + s[n] * x)`` (per-sample scale s: 0 or 1/(1-p), p = 0.2).

Variants: ``eager`` (``F.relu(r + x)`` / ``F.relu(r + s.view(-1,1,1,1) * x)``),
``compile`` (torch.compile of that same function, once per shape / layout /
dtype / op) and ``convkernels-<backend>`` (``convkernels.ops.add_act``).

Cases: every shape x layout x dtype x op (add_relu, add_relu_sd) x {fwd,
fwd+bwd}, both with autograd recording on (as in training); fwd+bwd takes
autograd.grad w.r.t. x and r with a fixed grad_y. s has x's dtype in every variant.

Ideal bytes, E = element size, M = N*C*H*W:
  fwd      read x, r, write y                 -> 3 * M * E
  bwd      read grad_y, x, r, write grad_x, grad_r -> 5 * M * E
  fwd+bwd  the sum                            -> 8 * M * E
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

BENCH = "add_act"
DROP_P = 0.2
OPS = ["add_relu", "add_relu_sd"]
DIRECTIONS = ["fwd", "fwd+bwd"]


def eager_add(inp):
    return F.relu(inp["residual"] + inp["x"])


def eager_add_sd(inp):
    return F.relu(inp["residual"] + inp["scale"].view(-1, 1, 1, 1) * inp["x"])


def fused_add(inp):
    return common.ck.ops.add_act(inp["x"], inp["residual"], "relu", inp.get("scale"))


def make_base(shape, layout, dtype, device) -> dict:
    g = torch.Generator().manual_seed(1)
    keep = (torch.rand(shape[0], generator=g) >= DROP_P).float() / (1 - DROP_P)
    return dict(
        x=common.randn(shape, dtype, device, layout, gen=g),
        residual=common.randn(shape, dtype, device, layout, gen=g),
        grad_y=common.randn(shape, dtype, device, layout, gen=g),
        scale=keep.to(device=device, dtype=dtype),
    )


def build_cases(args, device) -> list:
    cases = []
    for shape, numel, layout, dtype, base in common.shape_grid(args, device, make_base):
        for op in OPS:
            sd = op == "add_relu_sd"
            names = ["x", "residual", "grad_y"] + (["scale"] if sd else [])
            for direction in DIRECTIONS:
                def make_inputs(base=base, names=names):
                    return common.clone_inputs(base(), names, ("x", "residual"))

                esize = torch.empty((), dtype=dtype).element_size()
                nbytes = (3 + (5 if direction == "fwd+bwd" else 0)) * numel * esize
                case = "/".join([timing.shape_str(shape), layout, timing.DTYPE_NAMES[dtype],
                                 op, "train", direction])
                cases.append(common.Case(
                    bench=BENCH, case=case, make_inputs=make_inputs,
                    eager=eager_add_sd if sd else eager_add, fused=fused_add,
                    direction=direction, grad_mode=True, nbytes=nbytes, dtype=dtype,
                    diff=("x", "residual"), compile_key=(shape, layout, dtype, op),
                    note="bytes: fwd R(x,r)+W(y)"
                         + ("; bwd R(gy,x,r)+W(gx,gr)" if direction == "fwd+bwd" else ""),
                ))
    return cases


def main(argv=None) -> list:
    return common.bench_main(__doc__.splitlines()[0], BENCH, build_cases, argv)


if __name__ == "__main__":
    main()
