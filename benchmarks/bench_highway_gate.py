"""highway_gate benchmark: a highway layer's gate combination
``h * t + x * (1 - t)``, ``t = sigmoid(gate)``.

Variants: ``eager`` (that formula in torch), ``compile`` (torch.compile of the
same function, once per shape / layout / dtype) and ``convkernels-<backend>``
(``convkernels.ops.highway_gate``).

Cases: every shape x layout x dtype of the shape grid x {fwd, fwd+bwd}, with
autograd recording on (as in training); fwd+bwd takes autograd.grad w.r.t. h,
gate and x with a fixed grad_y.

Ideal bytes, E = element size, M = N*C*H*W:
  fwd      read h, gate, x, write y                          -> 4 * M * E
  bwd      read grad_y, h, gate, x, write the three gradients -> 7 * M * E
  fwd+bwd  the sum                                           -> 11 * M * E
"""
from __future__ import annotations

import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import timing  # noqa: E402

BENCH = "highway_gate"
DIRECTIONS = ["fwd", "fwd+bwd"]
DIFF = ("h", "gate", "x")


def eager(inp):
    t = torch.sigmoid(inp["gate"])
    return inp["h"] * t + inp["x"] * (1 - t)


def fused(inp):
    return common.ck.ops.highway_gate(inp["h"], inp["gate"], inp["x"])


def make_base(shape, layout, dtype, device) -> dict:
    g = torch.Generator().manual_seed(1)
    return {n: common.randn(shape, dtype, device, layout, gen=g) for n in (*DIFF, "grad_y")}


def build_cases(args, device) -> list:
    cases = []
    for shape, numel, layout, dtype, base in common.shape_grid(args, device, make_base):
        for direction in DIRECTIONS:
            def make_inputs(base=base):
                return common.clone_inputs(base(), (*DIFF, "grad_y"), DIFF)

            esize = torch.empty((), dtype=dtype).element_size()
            nbytes = (4 + (7 if direction == "fwd+bwd" else 0)) * numel * esize
            case = "/".join([timing.shape_str(shape), layout, timing.DTYPE_NAMES[dtype],
                             "highway_gate", "train", direction])
            cases.append(common.Case(
                bench=BENCH, case=case, make_inputs=make_inputs, eager=eager, fused=fused,
                direction=direction, grad_mode=True, nbytes=nbytes, dtype=dtype, diff=DIFF,
                compile_key=(shape, layout, dtype), note="bytes: fwd R(h,gate,x)+W(y)"
                + ("; bwd R(gy,h,gate,x)+W(gh,gg,gx)" if direction == "fwd+bwd" else "")))
    return cases


def main(argv=None) -> list:
    return common.bench_main(__doc__.splitlines()[0], BENCH, build_cases, argv)


if __name__ == "__main__":
    main()
