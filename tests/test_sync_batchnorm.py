"""SyncBatchNormAct2d and convert_sync_batchnorm: two gloo processes on the
loopback interface, each with half of a batch, against one process normalising the whole
batch with nn.BatchNorm2d (float64: outputs, input and parameter gradients,
running statistics)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import convkernels
from convkernels.nn import BatchNormAct2d, SyncBatchNormAct2d, convert_sync_batchnorm

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.xdist_group("sync_batchnorm")]  # one gloo group for every case

# One rank: runs its half of the batch of every case, saves what it saw.
_RANK = """
import sys, torch, torch.distributed as dist
import convkernels
from convkernels.nn import SyncBatchNormAct2d
cases, rank, out = torch.load(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=sys.argv[4], rank=rank, world_size=2)
results = []
for case in cases:
    half = case["x"].size(0) // 2
    sl = slice(rank * half, (rank + 1) * half)
    x = case["x"][sl].clone().requires_grad_(True)
    res = None if case["residual"] is None else case["residual"][sl].clone().requires_grad_(True)
    bn = SyncBatchNormAct2d(x.size(1), momentum=case["momentum"], act=case["act"]).double()
    bn.load_state_dict(case["state"])
    with convkernels.use_backend(case["backend"]):
        for _ in range(2):  # two steps: the running stats and num_batches_tracked move twice
            y = bn(x, res) if res is not None else bn(x)
            (y * case["grad"][sl]).sum().backward()
    results.append(dict(y=y.detach(), gx=x.grad, gr=None if res is None else res.grad,
                        gw=bn.weight.grad, gb=bn.bias.grad, state=bn.state_dict()))
torch.save(results, out)
dist.barrier()  # neither rank tears its connections down while the other still uses them
dist.destroy_process_group()
"""

BACKENDS = ["cpu", "reference"] if convkernels.backend.available("cpu", "cpu") else ["reference"]
CONFIGS = [("relu", True, 0.1), ("silu", False, None), ("identity", False, 0.3)]
CASES = [(b, *c) for b in BACKENDS for c in CONFIGS]


def _case(backend, act, residual, momentum):
    g = torch.Generator().manual_seed(0)
    shape = (6, 5, 4, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[3:] = x[3:] * 2 + 1  # the ranks' halves have different statistics
    state = nn.BatchNorm2d(5).double().state_dict()
    state["weight"] = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    state["bias"] = torch.randn(5, generator=g, dtype=torch.float64)
    state["running_mean"] = torch.randn(5, generator=g, dtype=torch.float64)
    state["running_var"] = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    return dict(x=x, grad=torch.randn(shape, generator=g, dtype=torch.float64), state=state,
                residual=torch.randn(shape, generator=g, dtype=torch.float64) if residual else None,
                act=act, momentum=momentum, backend=backend)


def run_two_ranks(script: str, inputs, tmp) -> list:
    """What ``script`` saved on each rank of a 2-process gloo group, given
    ``inputs`` (argv: inputs file, rank, output file, init method)."""
    torch.save(inputs, tmp / "inputs.pt")
    init = f"file://{tmp / 'rendezvous'}"  # no port to race for
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp / "inputs.pt"), str(r),
                               str(tmp / f"rank{r}.pt"), init],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              # gloo's connections on the loopback interface only
                              env={**os.environ, "OMP_NUM_THREADS": "1",
                                   "GLOO_SOCKET_IFNAME": "lo"})
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case's results from both ranks of one 2-process gloo group."""
    cases = [_case(*c) for c in CASES]
    ranks = run_two_ranks(_RANK, cases, tmp_path_factory.mktemp("sync_bn"))
    return {c: (case, [ranks[0][i], ranks[1][i]]) for i, (c, case) in enumerate(zip(CASES, cases))}


def _reference(case):
    """One process, the whole batch, torch's BatchNorm2d + act."""
    x = case["x"].clone().requires_grad_(True)
    res = None if case["residual"] is None else case["residual"].clone().requires_grad_(True)
    bn = nn.BatchNorm2d(x.size(1), momentum=case["momentum"]).double()
    bn.load_state_dict(case["state"])
    act = {"relu": F.relu, "identity": lambda t: t, "silu": F.silu}[case["act"]]
    for _ in range(2):
        z = bn(x)
        y = act(z + res if res is not None else z)
        (y * case["grad"]).sum().backward()
    return dict(y=y.detach(), gx=x.grad, gr=None if res is None else res.grad,
                gw=bn.weight.grad, gb=bn.bias.grad, state=bn.state_dict())


@pytest.mark.parametrize("config", CASES, ids=lambda c: "-".join(map(str, c)))
def test_two_gloo_ranks_equal_one_process(two_ranks, config):
    case, ranks = two_ranks[config]
    want = _reference(case)
    tol = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), want["y"], **tol)
    torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), want["gx"], **tol)
    if case["residual"] is not None:
        torch.testing.assert_close(torch.cat([r["gr"] for r in ranks]), want["gr"], **tol)
    # each rank holds its share of the parameter gradient (DDP would sum them)
    torch.testing.assert_close(ranks[0]["gw"] + ranks[1]["gw"], want["gw"], **tol)
    torch.testing.assert_close(ranks[0]["gb"] + ranks[1]["gb"], want["gb"], **tol)
    for r in ranks:  # every rank's running statistics are the whole batch's
        for k, v in want["state"].items():
            torch.testing.assert_close(r["state"][k], v, **tol)


def test_single_process_is_batchnorm_act():
    """No process group: local statistics, exactly BatchNormAct2d (and BatchNorm2d)."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    a, b = SyncBatchNormAct2d(3, act="relu").double(), nn.BatchNorm2d(3).double()
    torch.testing.assert_close(a(x), F.relu(b(x)))
    torch.testing.assert_close(a.running_var, b.running_var)


def test_convert_keeps_parameters_buffers_and_acts():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(BatchNormAct2d(4, act="silu")), nn.BatchNorm1d(4))
    before = dict(model.state_dict(keep_vars=True))
    keys = list(model.state_dict())
    model.eval()
    converted = convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[1]) is SyncBatchNormAct2d and model[1].act == "identity"
    assert type(model[3][0]) is SyncBatchNormAct2d and model[3][0].act == "silu"
    assert type(model[4]) is nn.BatchNorm1d  # not a 2-D BatchNorm: left alone
    assert not model[1].training
    assert list(model.state_dict()) == keys
    for k, v in model.state_dict(keep_vars=True).items():
        assert v is before[k], k
    bn = nn.BatchNorm2d(2)
    assert type(convert_sync_batchnorm(bn)) is SyncBatchNormAct2d


# One rank of an optimized model after convert_sync_batchnorm: its half of the
# batch, two training steps; records the activations the synchronised parts fold.
_MODEL_RANK = """
import sys, torch, torch.distributed as dist
import convkernels
from convkernels.nn import SyncBatchNormAct2d, convert_sync_batchnorm
model, x, grad = torch.load(sys.argv[1], weights_only=False)
rank, out = int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=sys.argv[4], rank=rank, world_size=2)
folded, synced = [], SyncBatchNormAct2d.synced
SyncBatchNormAct2d.synced = lambda self, x, act, *a: folded.append(act) or synced(self, x, act, *a)
model = convert_sync_batchnorm(convkernels.optimize(model)).train()
half = x.size(0) // 2
sl = slice(rank * half, (rank + 1) * half)
xi = x[sl].clone().requires_grad_(True)
for _ in range(2):
    y = model(xi)
    (y * grad[sl]).sum().backward()
torch.save(dict(y=y.detach(), gx=xi.grad, folded=folded, state=model.state_dict(),
                grads={n: p.grad for n, p in model.named_parameters()}), out)
dist.barrier()
dist.destroy_process_group()
"""


def test_optimized_model_two_gloo_ranks_equal_one_process(tmp_path):
    """``convkernels.nn.convert_sync_batchnorm`` of an optimized model: its
    fused parts keep the activation fused with the synchronised BatchNorm
    (conv -> BN -> ReLU, conv -> BN -> SiLU, BN -> ReLU), and two ranks train
    as one process on the whole batch with torch's modules (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.SiLU(),
                          nn.BatchNorm2d(5), nn.ReLU()).double()
    x = torch.randn(6, 3, 5, 4, dtype=torch.float64)
    x[3:] = x[3:] * 2 + 1  # the ranks' halves have different statistics
    grad = torch.randn(6, 5, 5, 4, dtype=torch.float64)
    ranks = run_two_ranks(_MODEL_RANK, (model, x, grad), tmp_path)
    assert ranks[0]["folded"] == ["relu", "silu", "relu"] * 2
    ref = model.train()
    xr = x.clone().requires_grad_(True)
    for _ in range(2):
        y = ref(xr)
        (y * grad).sum().backward()
    tol = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), xr.grad, **tol)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][n] + ranks[1]["grads"][n], p.grad, **tol)
    for r in ranks:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, **tol)
