"""torch.library.opcheck on every convkernels op, on every native backend here."""
import pytest
import torch
from torch.library import opcheck

import convkernels  # noqa: F401

from harness import TARGET_IDS, TARGETS, make, on, vector

ops = torch.ops.convkernels


def _bn_samples(device):
    x = make((2, 3, 4, 5), torch.float32, device, seed=1).requires_grad_(True)
    r = make((2, 3, 4, 5), torch.float32, device, seed=2).requires_grad_(True)
    w = vector(3, torch.float32, device, 3).requires_grad_(True)
    b = vector(3, torch.float32, device, 4).requires_grad_(True)
    rm, rv = vector(3, torch.float32, device, 5), vector(3, torch.float32, device, 6)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    return x, r, w, b, rm, rv, xcl


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_bn_act_ops(target):
    x, r, w, b, rm, rv, xcl = _bn_samples(target.device)
    with on(target):
        for training in (True, False):
            opcheck(ops.bn_act, (x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, "relu", r))
            opcheck(ops.bn_act, (xcl, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-5, "silu", None))
            opcheck(ops.bn_act_forward, (x, w, b, r, rm, rv, training, 1e-5, "sigmoid"))
            mean, var = rm + 0.1, rv + 0.2
            g = torch.randn_like(x)
            opcheck(ops.bn_act_backward, (g, x.detach(), w.detach(), b.detach(), r.detach(), mean, var,
                                          training, 1e-5, "relu", [True, True, True, True]))
            opcheck(ops.bn_act_backward, (g, x.detach(), None, None, None, mean, var,
                                          training, 1e-5, "identity", [True, False, False, False]))
        opcheck(ops.update_running_stats, (rm.clone(), rv.clone(), rm + 1, rv + 1, 0.1, 40))


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_add_act_ops(target):
    x, r, *_ = _bn_samples(target.device)
    scale = torch.tensor([0.0, 1.25], device=target.device)
    g = torch.randn_like(x)
    with on(target):
        opcheck(ops.add_act, (x, r, "relu", scale))
        opcheck(ops.add_act, (x, r, "silu", None))
        opcheck(ops.add_act_forward, (x, r, "sigmoid", scale))
        opcheck(ops.add_act_backward, (g, x.detach(), r.detach(), "relu", scale, [True, True]))
        opcheck(ops.add_act_backward, (g, x.detach(), r.detach(), "relu", None, [False, True]))
