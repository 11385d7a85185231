"""The fused ops under graph recording. torch.export keeps each public op as
one node whose decomposition is its reference composite (aten ops), which is
what the ONNX exporter records; torch.jit.trace records the reference's aten
ops. So a module written with convkernels.nn / convkernels.ops exports to ONNX
as standard ops that run without convkernels (onnxruntime), and exported
programs take a dynamic batch and torch's autograd. One network per op family
(``NETS``), each through every recorder."""
import copy

import pytest
import torch
from torch import nn

import convkernels
from convkernels import ops
from convkernels.nn import BatchNormAct2d, BNActConv2d, ConvBNAct2d


class Net(nn.Module):
    """The fused modules and ops a user's own CNN would call directly."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct2d(3, 8, 3, padding=1, act="relu")
        self.unit = BNActConv2d(8, 8, 3, padding=1, act="silu")
        self.join = ConvBNAct2d(8, 8, 1, act="identity")
        self.head = BatchNormAct2d(8, act="sigmoid")

    def forward(self, x):
        y = self.stem(x)
        z = self.join(self.unit(y))
        return self.head(ops.add_act(z, y, act="relu")).mean((2, 3))


class ConvActNet(nn.Module):
    """conv_act as a user's own CNN would call it: conv + bias + act, and one
    with a residual."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = ops.conv_act(x, self.c1.weight, self.c1.bias, padding=1, act="relu")
        z = ops.conv_act(y, self.c2.weight, self.c2.bias, padding=1, act="sigmoid", residual=y)
        return z.mean((2, 3))


class HighwayGateNet(nn.Module):
    """highway_gate as a user's own highway layer would call it."""

    def __init__(self):
        super().__init__()
        self.h = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return ops.highway_gate(torch.relu(self.h(x)), self.gate(x), x).mean((2, 3))


# name: (module, the public ops its graph holds, ONNX ops its export must use)
NETS = {
    "blocks": (Net, {f"convkernels.{op}.default"
                     for op in ("conv_bn_act", "bn_act_conv", "bn_act", "add_act")}, {"Conv"}),
    "conv_act": (ConvActNet, {"convkernels.conv_act.default"}, {"Conv", "Relu", "Sigmoid"}),
    "highway_gate": (HighwayGateNet, {"convkernels.highway_gate.default"}, {"Sigmoid"}),
}


def _net(name="blocks", dtype=torch.float32):
    torch.manual_seed(0)
    net = NETS[name][0]().to(dtype)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return net


def _x(batch, dtype=torch.float32):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch), dtype=dtype)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _convkernels_ops(graph) -> set:
    return {str(n.target) for n in graph.nodes if "convkernels" in str(n.target)}


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_export_records_aten_ops_with_dynamic_batch(name, mode):
    net = _net(name, torch.float64).train(mode == "train")
    eager = copy.deepcopy(net)
    ep = torch.export.export(net, (_x(2, torch.float64),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2)}})
    # The public ops stay whole (runnable where convkernels is installed), never
    # their inner custom ops; run_decompositions turns them into aten ops.
    assert _convkernels_ops(ep.graph) and _convkernels_ops(ep.graph) <= NETS[name][1]
    decomposed = ep.run_decompositions()
    assert not _convkernels_ops(decomposed.graph)
    if mode == "eval":  # (a decomposed training program cannot run backward: torch's too)
        with torch.no_grad():
            assert _rel(decomposed.module()(_x(4, torch.float64)),
                        copy.deepcopy(eager)(_x(4, torch.float64))) < 1e-10
    x = _x(5, torch.float64).requires_grad_(True)
    got = ep.module()(x)
    xe = x.detach().clone().requires_grad_(True)
    want = eager(xe)
    assert _rel(got, want) < 1e-10
    got.sum().backward()
    want.sum().backward()
    assert _rel(x.grad, xe.grad) < 1e-10


@pytest.mark.parametrize("name", NETS)
def test_onnx_export_runs_in_onnxruntime(name):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net = _net(name).eval()
    batch = torch.export.Dim("batch", min=2)
    program = torch.onnx.export(net, (_x(2),), dynamo=True, dynamic_shapes={"x": {0: batch}})
    used = {node.op_type for node in program.model_proto.graph.node}
    assert NETS[name][2] <= used, used
    assert not any("convkernels" in d.domain for d in program.model_proto.opset_import)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = _x(3)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), net(x)) < 1e-5


@pytest.mark.parametrize("name", NETS)
def test_jit_trace_records_aten_ops(name):
    net = _net(name).eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, (_x(2),))
        assert "convkernels::" not in str(traced.inlined_graph)
        assert _rel(traced(_x(3)), net(_x(3))) < 1e-6


def test_torch_compile_keeps_the_fused_ops(monkeypatch):
    """Compiling is not exporting: the fused ops stay in the graph."""
    seen = []
    real = convkernels.backend.resolve
    monkeypatch.setattr(convkernels.backend, "resolve", lambda d: seen.append(real(d)) or seen[-1])
    net = _net().eval()
    with torch.no_grad():
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
        assert _rel(compiled(_x(2)), net(_x(2))) < 1e-5
    assert "reference" not in seen and seen
