"""Triton kernels of convkernels (installed as ``convkernels.triton_kernels``).

Exports the ten primitives of ``convkernels/ops/primitives.py`` with exactly the
contract's names and signatures, and ``conv2d_fused``: the implicit-GEMM conv
with a BN-act prologue and a bias/residual/act/statistics epilogue that the
fused conv ops run on. On CPU tensors they run only under
``TRITON_INTERPRET=1`` (set before triton is imported).

``compile_cases()`` lists every kernel specialisation (tile config x dtype x
activation x flags) for the ahead-of-time compile test; each kernel module
contributes its own ``compile_cases()``.
"""
from __future__ import annotations

from . import add_act as _add_act
from . import bn_act as _bn_act
from . import conv as _conv
from . import highway_gate as _highway_gate
from . import nt_xent as _nt_xent
from .activations import ACT_CODES, act_code
from .add_act import add_act_backward, add_act_forward
from .bn_act import (
    bn_act_apply,
    bn_act_backward_apply,
    bn_act_backward_reduce,
    channel_stats,
)
from .conv import conv2d_fused
from .highway_gate import highway_gate_backward, highway_gate_forward
from .layout import CompileCase
from .nt_xent import nt_xent_backward, nt_xent_forward

_KERNEL_MODULES = (_bn_act, _add_act, _conv, _nt_xent, _highway_gate)

__all__ = [
    "channel_stats",
    "bn_act_apply",
    "bn_act_backward_reduce",
    "bn_act_backward_apply",
    "add_act_forward",
    "add_act_backward",
    "highway_gate_forward",
    "highway_gate_backward",
    "nt_xent_forward",
    "nt_xent_backward",
    "conv2d_fused",
    "ACT_CODES",
    "act_code",
    "CompileCase",
    "compile_cases",
]


def compile_cases():
    """Every CompileCase of every kernel module (for tests/test_triton_compile.py)."""
    cases = []
    for mod in _KERNEL_MODULES:
        cases.extend(mod.compile_cases())
    return cases
