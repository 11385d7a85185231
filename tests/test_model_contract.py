"""The model contract (DESIGN.md, "Models: one mechanism"): what a drop-in keeps.

Each builder against its reference (``model_cases``: torchvision's model of the
same name, or the seeds' plain-torch module) with the same state dict (random
weights, randomised BN affine parameters and running statistics) on small
inputs: inference mode, NaN propagation, hooks (per module and global),
parametrizations, replaced submodules, submodules called on their own,
SyncBatchNorm, FX and feature extraction, torch.export, ONNX, TorchScript,
torch.compile (fullgraph),
caches, and torchvision's ModelTester checks (seeded init, eval backprop).
Which submodules are hooked, replaced or extracted is chosen from each model
(``Probe``), so a model joins by having a case, not by new test code.

Which builders: every one with ``CONVKERNELS_CONTRACT=all``. By default (``make
test``) the representatives in ``REPRESENTATIVES``, one per fused family and
op, and every seed model but the deeper pre-activation ResNets (34 and 101 are
18's and 50's blocks, more of them): ``test_every_builder_is_covered`` proves, for every builder, that each
fused part it has (family, op, activation) is one a representative exercises,
and that it has a case. The full set takes hours on a 2-core CPU (vgg19 and
regnet_y_128gf hold 143M and 644M parameters); ``python -m convkernels verify
--models all`` checks every builder's outputs and gradients at full width.

Tolerances (DESIGN.md, Verification): relative error ``||a - b|| / ||b||`` of
fp32 outputs <= 1e-4; float64 outputs and gradients <= 1e-6. Gradients are
compared in float64 only, eval mode included: in fp32 a ReLU input within
rounding of zero flips a whole gradient path (measured: densenet121's eval
input gradient at 64x64 is 5e-3 from float64 in torchvision's own channels_last
run, 6e-7 in its NCHW one, where float64 agrees to 1e-15). Train-mode forwards
run under the same seed in both models (dropout, stochastic depth).
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

torchvision = pytest.importorskip("torchvision")
from torchvision.models import feature_extraction  # noqa: E402

import convkernels  # noqa: E402
from convkernels.fuse._bind import bound  # noqa: E402
from model_cases import REDUCED_CASES, SEED_CASES, all_cases, builder_names, image  # noqa: E402
from model_checks import (ConvkernelsOps, assert_grads_and_buffers_match, one_thread,  # noqa: E402,F401
                          randomise_bn)

OUT_TOL = 1e-4   # fp32
GRAD_TOL = 1e-6  # float64

# One torchvision builder per fused family, bound class, op and activation (see
# test_every_builder_is_covered), and the seed models (small at their case widths)
# but two that add only depth (~60 s of the 2-core machine's make test).
_DEPTH_ONLY = ("preact_resnet34", "preact_resnet101")
# vgg11_bn's family runs on a VGG with a small classifier (model_cases.REDUCED_CASES:
# the full one's 103M parameters took ~200 s of make test).
REPRESENTATIVES = ("densenet121", "resnet18", "resnet50", "googlenet", "inception_v3",
                   "efficientnet_v2_s", "regnet_y_400mf", "vgg11_bn_head64",
                   *(c.name for c in SEED_CASES if c.name not in _DEPTH_ONLY))
ALL = os.environ.get("CONVKERNELS_CONTRACT") == "all"
CASES = {c.name: c for c in all_cases() + REDUCED_CASES}
CONTRACT = list(CASES.values()) if ALL else [CASES[n] for n in REPRESENTATIVES]


# -------------------------------------------------------------------- helpers
def tensors(v) -> list:
    """The tensors in an output or argument structure, in order (None dropped)."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for u in v for t in tensors(u)]
    if isinstance(v, dict):
        return [t for u in v.values() for t in tensors(u)]
    return []


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def close(a, b, what: str) -> None:
    """a and b (tensors or output structures) agree: shapes, dtypes, values."""
    ta, tb = tensors(a), tensors(b)
    # by name: each torch.jit.script makes its own GoogLeNetOutputs class
    assert type(a).__name__ == type(b).__name__ and len(ta) == len(tb), \
        f"{what}: {type(a)} vs {type(b)}"
    for i, (u, v) in enumerate(zip(ta, tb)):
        tol = GRAD_TOL if v.dtype == torch.float64 else OUT_TOL
        assert (u.shape, u.dtype) == (v.shape, v.dtype), f"{what} [{i}]"
        assert rel(u, v) <= tol, f"{what} [{i}]: relative error {rel(u, v):.3g}"


def outcome(fn):
    """``("ok", result)`` or ``("error", exception type)``: the reference's own
    errors are part of the behaviour to keep."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001
        return "error", type(e)


def seeded(model, *args):
    """A forward with the RNG at a fixed state: dropout and stochastic-depth
    masks are the same in both models."""
    torch.manual_seed(3)
    return model(*args)


def clone_args(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(clone_args(u) for u in v)
    if isinstance(v, dict):
        return {k: clone_args(u) for k, u in v.items()}
    return v


def _middle(names: list):
    return names[len(names) // 2] if names else None


@dataclass(frozen=True)
class Probe:
    """The submodules the tests reach into, chosen from the model: each one
    runs in an eval forward of the reference."""
    called: tuple   # every submodule an eval forward calls, in call order
    hooks: tuple    # hooked: the first conv, a fused forward, a conv, a BN, a top-level child
    convs: tuple    # parametrized ([0]) and written through .data (all)
    replaced: str   # a BatchNorm2d (else a Conv2d) replaced by a subclass
    nodes: tuple    # FX return nodes: graph nodes and a module path

    @classmethod
    def of(cls, ref: nn.Module, ours: nn.Module, x: torch.Tensor) -> "Probe":
        names = {id(m): n for n, m in ref.named_modules() if n}
        called = []
        handle = nn.modules.module.register_module_forward_pre_hook(
            lambda m, args: called.append(names[id(m)]) if id(m) in names else None)
        try:
            with torch.no_grad():
                ref.eval()(x)
        finally:
            handle.remove()
        called = tuple(dict.fromkeys(called))
        kinds = {n: type(ref.get_submodule(n)) for n in called}
        convs = [n for n in called if kinds[n] is nn.Conv2d]
        bns = [n for n in called if kinds[n] is nn.BatchNorm2d]
        fused = [n for n in called if bound(ours.get_submodule(n)) is not None]
        hooks = dict.fromkeys(n for n in (convs[0], _middle(fused), _middle(convs), _middle(bns),
                                          called[0]) if n)
        eval_nodes, train_nodes = feature_extraction.get_graph_node_names(ref)
        graph = [n for n in eval_nodes if n in set(train_nodes) and n not in ("x", "output")]
        nodes = dict.fromkeys((graph[len(graph) // 3], graph[2 * len(graph) // 3],
                               _middle(fused) or _middle(convs)))
        return cls(called, tuple(hooks), (_middle(convs), convs[0], convs[-1]),
                   _middle(bns) or _middle(convs), tuple(nodes))


# One xdist worker per model (``make test``'s --dist loadgroup): ``built`` and
# ``probe`` are made once per model, not once per worker.
@pytest.fixture(scope="module", params=[pytest.param(c, id=c.name, marks=pytest.mark.xdist_group(c.name))
                                        for c in CONTRACT])
def case(request):
    return request.param


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random BN affine parameters, running statistics of a batch other than the
    tests' (one training forward at momentum 1): eval is not the identity on BN,
    and deep models keep their activations in range (randomised running
    statistics make inception_v3's eval logits ~1e10, where fp32 rounding alone
    exceeds the tolerance)."""
    randomise_bn(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    with torch.no_grad():
        seeded(model.train(), x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model


@pytest.fixture(scope="module")
def built(case):
    """(ours, reference) with the same state dict; tests use copies (fresh)."""
    torch.manual_seed(0)
    ours, ref = case.ours(), case.reference()
    ref.load_state_dict(ours.state_dict(), strict=True)
    calibrate(ref, image(case, 4, seed=7))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def probe(built, case):
    ours, ref = fresh(built)
    return Probe.of(ref, ours, image(case))


def fresh(built, dtype=torch.float32):
    return tuple(copy.deepcopy(m).to(dtype) for m in built)


def _forward_backward(model, x):
    """Output and input gradient of a forward (seeded) and a backward of fixed
    output weights; a training-mode forward may return several outputs."""
    xi = x.clone().requires_grad_()
    y = seeded(model, xi)
    outs = tensors(y)
    torch.autograd.backward(outs, [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)
                                   for t in outs])
    return y, xi.grad


# ------------------------------------------------------- (1) inference mode
def test_inference_mode_then_no_grad_and_grad(built, case):
    ours, ref = fresh(built)
    ours.eval(), ref.eval()
    x = image(case)
    with torch.no_grad():
        want = ref(x)
    with torch.inference_mode():
        y = ours(x)
    assert all(t.is_inference() for t in tensors(y))
    close(y, want, "inference_mode")
    with torch.no_grad():
        close(ours(x), want, "no_grad after inference_mode")
    y, gx = _forward_backward(ours, x)
    close(y, want, "with autograd after inference_mode")
    assert gx.isfinite().all()


def test_model_built_inside_inference_mode(built, case):
    state = built[1].state_dict()
    x = image(case)
    with torch.inference_mode():
        pair = []
        for make in (case.ours, case.reference):
            m = make()
            m.load_state_dict(state)
            pair.append(m.eval())
        ours, ref = pair
        close(ours(x), ref(x), "inference_mode")
    with torch.no_grad():
        close(ours(x), ref(x), "no_grad, on inference-tensor parameters")
    # With autograd, the reference's inference-tensor parameters cannot be saved
    # for backward: ours must do what the reference does.
    got = outcome(lambda: ours(x.clone().requires_grad_()))
    want = outcome(lambda: ref(x.clone().requires_grad_()))
    assert got[0] == want[0]
    if got[0] == "ok":
        close(got[1], want[1], "with autograd")
    else:
        assert got[1] is want[1]


# ------------------------------------------------------------------ (2) NaN
@pytest.mark.parametrize("mode", ["train", "eval-no-grad", "eval-grad"])
def test_nan_pixel_where_the_reference_has_nan(built, case, probe, mode):
    ours, ref = fresh(built, torch.float64)
    x = image(case, dtype=torch.float64)
    x[1, 0, 5, 7] = float("nan")  # sample 0 stays finite in eval
    train, grad = mode == "train", mode != "eval-no-grad"
    conv = probe.convs[0]
    results = []
    for m in (ours, ref):
        m.train(train)
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = seeded(m, xi)
        if grad:
            torch.autograd.backward(tensors(y), [torch.ones_like(t) for t in tensors(y)])
        results.append((tensors(y), xi.grad, m.get_submodule(conv).weight.grad))
    (ys, gx, gw), (ys_ref, gx_ref, gw_ref) = results
    for what, a, b in [*((f"output {i}", u, v) for i, (u, v) in enumerate(zip(ys, ys_ref))),
                       ("input grad", gx, gx_ref), (f"{conv}.weight grad", gw, gw_ref)]:
        if b is None:
            assert a is None, what
            continue
        assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN elsewhere than the reference's"
        finite = ~b.isnan()
        if finite.any():
            close(a[finite], b[finite], f"{what} where finite")


# ---------------------------------------------------------------- (3) hooks
def _scaled(v):
    """What the hooks return: every tensor in v times 1.0625 (None kept; a small
    change, since deep eval models amplify a larger one out of float64 range)."""
    if isinstance(v, torch.Tensor):
        return v * 1.0625
    if isinstance(v, (tuple, list)):
        return type(v)(_scaled(u) for u in v)
    return v


def _clones(v) -> list:
    return [t.detach().clone() for t in tensors(v)]


def _hook(module: nn.Module, kind: str, record: list):
    """A hook of ``kind`` that records the tensors it sees and returns them scaled."""
    if kind == "pre":
        def pre(m, args):
            record.append(_clones(args))
            return _scaled(args)
        return module.register_forward_pre_hook(pre)
    if kind == "forward":
        def fwd(m, args, out):
            record.append(_clones(args) + _clones(out))
            return _scaled(out)
        return module.register_forward_hook(fwd)

    def bwd(m, grad_in, grad_out):
        record.append(_clones(grad_in) + _clones(grad_out))
        return _scaled(grad_in)
    return module.register_full_backward_hook(bwd)


@pytest.mark.parametrize("kind", ["pre", "forward", "backward"])
def test_hooks_fire_with_the_references_tensors_and_are_used(built, case, probe, kind):
    """Eval with autograd (float64): each hook fires as often as the
    reference's (once per call, forward and backward), sees its tensors, and
    what it returns is used."""
    ours, ref = fresh(built, torch.float64)
    ours.eval(), ref.eval()
    x = image(case, dtype=torch.float64)
    for target in probe.hooks:
        records, handles = [], []
        for m in (ours, ref):
            records.append([])
            handles.append(_hook(m.get_submodule(target), kind, records[-1]))
        got = outcome(lambda: _forward_backward(ours, x))
        want = outcome(lambda: _forward_backward(ref, x))
        for h in handles:
            h.remove()
        assert got[0] == want[0], f"{target}: {got} vs {want}"
        if want[0] == "error":  # e.g. a full backward hook whose output is modified in place
            assert got[1] is want[1], target
            continue
        assert len(records[0]) == len(records[1]) >= 1, \
            f"{target}: fired {len(records[0])} times, the reference's {len(records[1])}"
        for call, (a, b) in enumerate(zip(*records)):
            assert len(a) == len(b), target
            for i, (u, v) in enumerate(zip(a, b)):
                close(u, v, f"{target} {kind} hook, call {call}, tensor {i}")
        close(got[1][0], want[1][0], f"{target}: output")
        close(got[1][1], want[1][1], f"{target}: input grad")


def test_global_forward_hook(built, case):
    """A global forward hook fires for every module call, in the reference's
    order, with the reference's outputs."""
    ours, ref = fresh(built)
    ours.eval(), ref.eval()
    x = image(case)
    results = []
    for m in (ours, ref):
        names = {id(mod): n for n, mod in m.named_modules()}
        record = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda mod, args, out, names=names, record=record: record.append(
                (names.get(id(mod)), _clones(out))))
        try:
            with torch.no_grad():
                y = m(x)
        finally:
            handle.remove()
        results.append((y, record))
    (y, rec), (y_ref, rec_ref) = results
    assert [n for n, _ in rec] == [n for n, _ in rec_ref]
    for (name, a), (_, b) in zip(rec, rec_ref):
        for t, u in zip(a, b):
            close(t, u, f"global hook: {name}")
    close(y, y_ref, "output")


class _Half(nn.Module):
    def forward(self, w):
        return w * 0.5


class _ShiftedBN(nn.BatchNorm2d):
    """A user's BatchNorm2d subclass that computes something else."""

    def forward(self, x):
        return super().forward(x) + 0.25


class _ShiftedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 0.25


def _shifted(old: nn.Module) -> nn.Module:
    """A subclass instance of ``old``'s class (BatchNorm2d or Conv2d) with its state."""
    dtype = old.weight.dtype
    if isinstance(old, nn.BatchNorm2d):
        new = _ShiftedBN(old.num_features, old.eps, old.momentum, dtype=dtype)
    else:
        new = _ShiftedConv(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                           old.padding, old.dilation, old.groups, old.bias is not None,
                           dtype=dtype)
    new.load_state_dict(old.state_dict())
    return new


def _eval_and_train_match(built, case, edit, what: str,
                          memory_format=torch.contiguous_format) -> None:
    """After ``edit(model)`` on both: eval in fp32 and training in float64 (in
    fp32, training BN at these sizes is ill-conditioned for any implementation:
    inception_v3 at 107x107 is 1.8e-4 from float64 in torchvision's own NCHW
    forward, 4.7e-4 in its channels_last one). Both models and the input in
    ``memory_format`` (dropout draws its mask in memory order)."""
    for train, dtype in ((False, torch.float32), (True, torch.float64)):
        ours, ref = fresh(built, dtype)
        for m in (ours, ref):
            edit(m)
            m.to(memory_format=memory_format).train(train)
        x = image(case, dtype=dtype).contiguous(memory_format=memory_format)
        with torch.no_grad():
            close(seeded(ours, x), seeded(ref, x), f"{what}, {'train' if train else 'eval'}")


def test_parametrized_conv(built, case, probe):
    _eval_and_train_match(built, case, lambda m: parametrize.register_parametrization(
        m.get_submodule(probe.convs[0]), "weight", _Half()), f"{probe.convs[0]} parametrized")


def test_replaced_by_a_subclass(built, case, probe):
    parent_name, _, attr = probe.replaced.rpartition(".")

    def replace(m):
        parent = m.get_submodule(parent_name)
        setattr(parent, attr, _shifted(getattr(parent, attr)))
    _eval_and_train_match(built, case, replace, f"{probe.replaced} replaced")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_submodules_called_on_their_own(built, case, probe, train):
    """Every submodule a forward calls, called on its own with the input the
    reference's forward gave it, gives the reference's output."""
    ours, ref = fresh(built)
    ours.train(train), ref.train(train)
    inputs, capture = {}, copy.deepcopy(ref)

    def record(name, args, kwargs):  # the first call's input (returns None: changes nothing)
        if name not in inputs:
            inputs[name] = clone_args((args, kwargs))

    handles = [capture.get_submodule(n).register_forward_pre_hook(
        lambda m, args, kwargs, n=n: record(n, args, kwargs), with_kwargs=True)
        for n in probe.called]
    with torch.no_grad():
        seeded(capture, image(case))
    for h in handles:
        h.remove()
    with torch.no_grad():
        for name, (args, kwargs) in inputs.items():
            got = seeded(ours.get_submodule(name), *clone_args(args), **clone_args(kwargs))
            close(got, seeded(ref.get_submodule(name), *args, **kwargs), name)


# ---------------------------------------------------------- (4) SyncBatchNorm
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_sync_batchnorm_runs_the_converted_modules(built, case, monkeypatch, train):
    """Without a process group SyncBatchNorm normalises locally; every converted
    module is the one that runs (counted on the class: a hook would itself send
    the parts back to the modules), and no fused op covers a BatchNorm."""
    x = image(case)
    calls, outputs, seen = [], [], []
    forward = nn.SyncBatchNorm.forward
    monkeypatch.setattr(nn.SyncBatchNorm, "forward",
                        lambda self, x: calls[-1].append(self.qualname) or forward(self, x))
    for m in fresh(built):
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(m).train(train)
        for name, bn in synced.named_modules():
            if isinstance(bn, nn.SyncBatchNorm):
                bn.qualname = name
        calls.append([])
        with torch.no_grad(), ConvkernelsOps() as ops_seen:
            outputs.append(seeded(synced, x))
        seen.append(ops_seen.seen)
    assert calls[0] == calls[1], "SyncBatchNorm modules called otherwise than the reference's"
    if calls[1]:
        assert not {op for op in seen[0] if "bn" in op}, sorted(seen[0])
    close(*outputs, "SyncBatchNorm")


# ----------------------------------------------------------------------- (5) FX
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fx_symbolic_trace(built, case, train):
    ours, ref = fresh(built)
    ours.train(train), ref.train(train)
    gm = torch.fx.symbolic_trace(ours)
    assert ours.training == train
    x = image(case)
    with torch.no_grad():
        close(seeded(gm, x), seeded(ref, x), "symbolic_trace")


def _module_nodes(nodes: list, model: nn.Module) -> list:
    """The nodes that name module calls (``layer1.0.relu``, ``layer1.0.relu_1``)."""
    names = set(dict(model.named_modules())) - {""}
    return [n for n in nodes if n in names or n.rpartition("_")[0] in names]


def test_feature_extraction_with_the_references_node_names(built, case, probe):
    """torchvision's models: torchvision's node names, every one. The seed
    references are written from the seeds, not from our code: the same module
    calls (how a mask's shape is read is theirs to write)."""
    ours, ref = fresh(built)
    graphs = [feature_extraction.get_graph_node_names(m) for m in (ours, ref)]
    if case.seeded:
        assert graphs[0] == graphs[1]
    else:
        for mine, theirs in zip(*graphs):
            assert _module_nodes(mine, ours) == _module_nodes(theirs, ref)
    x = image(case)
    nodes = list(probe.nodes)
    for train in (False, True):
        ours.train(train), ref.train(train)
        extractors = [feature_extraction.create_feature_extractor(m, return_nodes=nodes)
                      for m in (ours, ref)]
        assert ours.training == train, "create_feature_extractor changed the training mode"
        for fe in extractors:
            fe.train(train)
        with torch.no_grad():
            got, want = (seeded(fe, x) for fe in extractors)
        assert list(got) == list(want) and set(got) == set(nodes)
        for name in nodes:
            close(got[name], want[name], f"{name}, {'train' if train else 'eval'}")


# ------------------------------------------------------------- (6) torch.export
def test_torch_export_dynamic_batch_and_gradients(built, case, tmp_path):
    ours, ref = fresh(built)
    dynamic = {"x": {0: torch.export.Dim("batch", min=2)}}
    ours.eval(), ref.eval()
    ep = torch.export.export(ours, (image(case),), dynamic_shapes=dynamic)
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        for n in (2, 3):
            x = image(case, n, seed=n)
            close(ep.module()(x), ref(x), f"exported eval, batch {n}")
            close(loaded.module()(x), ref(x), f"saved and loaded eval, batch {n}")
    ours, ref = fresh(built, torch.float64)
    ours.train(), ref.train()
    exported = torch.export.export(ours, (image(case, 2, torch.float64),),
                                   dynamic_shapes=dynamic).module()
    for n in (2, 3):
        x = image(case, n, torch.float64, seed=n)
        (y, gx), (y_ref, gx_ref) = _forward_backward(exported, x), _forward_backward(ref, x)
        close(y, y_ref, f"exported train, batch {n}")
        close(gx, gx_ref, f"exported train input grad, batch {n}")
    ref_params = dict(ref.named_parameters())
    for name, p in exported.named_parameters():
        if ref_params[name].grad is None:
            assert p.grad is None, name
        else:
            close(p.grad, ref_params[name].grad, f"exported train grad {name}")


# ---------------------------------------------------------------------- (7) ONNX
def test_onnx_export_runs_in_onnxruntime(built, case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ours, ref = fresh(built)
    ours.eval(), ref.eval()
    program = torch.onnx.export(ours, (image(case),), dynamo=True, verbose=False,
                                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2)}})
    path = str(tmp_path / "model.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (2, 3):
        x = image(case, n, seed=n)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            close(torch.from_numpy(y), ref(x), f"onnxruntime, batch {n}")


# ----------------------------------------------------------------- (8) TorchScript
def test_jit_trace(built, case):
    ours, ref = fresh(built)
    ours.eval(), ref.eval()
    with torch.no_grad():
        traced = torch.jit.trace(ours, image(case))
        for n in (2, 3):
            x = image(case, n, seed=n)
            close(traced(x), ref(x), f"traced, batch {n}")


def test_jit_script_works_as_the_references_or_names_torch_export(built, case):
    """``torch.jit.script`` compiles ours wherever it compiles the reference,
    and the scripted models agree (a scripted torchvision GoogLeNet returns its
    namedtuple in eval too)."""
    ours, ref = fresh(built)
    ours.eval(), ref.eval()
    want = outcome(lambda: torch.jit.script(ref))
    try:
        scripted = torch.jit.script(ours)
    except Exception as e:  # noqa: BLE001
        assert want[0] == "error" or "torch.export" in str(e), \
            f"unclear error: {type(e).__name__}: {e}"
        return
    x = image(case)
    with torch.no_grad():
        close(scripted(x), want[1](x) if want[0] == "ok" else ref(x), "scripted")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph(built, case, train):
    """``torch.compile(fullgraph=True)`` traces ours with no graph break (the
    fused ops and their autograd included) and gives the reference's results:
    eval outputs in fp32; in training, in float64 (see _eval_and_train_match),
    the outputs, the input and parameter gradients and the running statistics.
    aot_eager: the trace is what is tested, inductor's code generation is torch's."""
    dtype = torch.float64 if train else torch.float32
    ours, ref = fresh(built, dtype)
    ours.train(train), ref.train(train)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager", dynamic=False)
    x = image(case, dtype=dtype)
    if not train:
        with torch.no_grad():
            close(seeded(compiled, x), seeded(ref, x), "compiled, eval")
        return
    (y, gx), (y_ref, gx_ref) = _forward_backward(compiled, x), _forward_backward(ref, x)
    close(y, y_ref, "compiled, train")
    close(gx, gx_ref, "compiled, input gradient")
    assert_grads_and_buffers_match(ours, ref, GRAD_TOL)


# ----------------------------------------------------------------- (9) caches
def test_clear_caches_after_a_data_write(built, case, probe):
    """``.data`` writes bump no version counter: derived weights cached by the
    fused eval path are stale until ``clear_caches``."""
    ours, ref = fresh(built)
    ours.eval(), ref.eval()
    x = image(case)
    with torch.no_grad():
        ours(x)
        for name in dict.fromkeys(probe.convs):
            for m in (ours, ref):
                m.get_submodule(name).weight.data.mul_(-0.5)
        convkernels.clear_caches()
        close(ours(x), ref(x), "after .data writes and clear_caches")


# ------------------------------------------------- layouts and bf16 autocast
BF16_TOL = 5e-2  # bf16 autocast against fp32: at least, or twice the reference's own


def test_channels_last(built, case):
    """A channels_last model on a channels_last input: the reference's outputs."""
    _eval_and_train_match(built, case, lambda m: None, "channels_last", torch.channels_last)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bf16_autocast(built, case, train):
    """Under CPU bf16 autocast the outputs are as close to fp32 as the
    reference's own under the same autocast (within twice its error)."""
    ours, ref = fresh(built)
    ours.train(train), ref.train(train)
    x = image(case)
    with torch.no_grad():
        want = seeded(ref, x)
        with torch.autocast("cpu", torch.bfloat16):
            got, ref_bf16 = seeded(ours, x), seeded(ref, x)
    for i, (u, v, w) in enumerate(zip(tensors(got), tensors(ref_bf16), tensors(want))):
        assert u.dtype == v.dtype, f"bf16 autocast [{i}]"
        tol = max(BF16_TOL, 2 * rel(v, w))
        assert rel(u, w) <= tol, f"bf16 autocast [{i}]: {rel(u, w):.3g} > {tol:.3g}"


# ------------------------------------------------------- (10) ModelTester
def test_seeded_init_and_eval_backprop(case):
    """torchvision's ModelTester: a seeded builder gives the reference's
    initial parameters exactly (where the reference is the same builder), and
    eval-mode backprop reaches the input and every parameter the reference's
    reaches, with its gradients (float64)."""
    for kwargs in case.variants:
        pair = []
        for make in (case.ours, case.reference):
            torch.manual_seed(0)
            pair.append(make(num_classes=50, **kwargs) if case.seeded else make(**kwargs))
        ours, ref = pair
        assert type(ours) is type(ref) or not case.seeded
        state, ref_state = ours.state_dict(), ref.state_dict()
        # torchvision's key order too; a seed reference declares its modules its own way
        assert list(state) == list(ref_state) if case.seeded else set(state) == set(ref_state)
        if case.seeded:
            for k, v in ref_state.items():
                assert torch.equal(state[k], v), f"{kwargs}: {k}"
        else:
            ref.load_state_dict(state)
        ours, ref = ours.double().eval(), ref.double().eval()
        x = image(case, dtype=torch.float64)
        (y, gx), (y_ref, gx_ref) = _forward_backward(ours, x), _forward_backward(ref, x)
        close(y, y_ref, f"{kwargs}: output")
        close(gx, gx_ref, f"{kwargs}: input grad")
        ref_params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            if ref_params[name].grad is None:  # e.g. inception's aux head in eval
                assert p.grad is None, f"{kwargs}: {name}"
                continue
            assert p.grad is not None, f"{kwargs}: no grad for {name}"
            close(p.grad, ref_params[name].grad, f"{kwargs}: grad {name}")


# ------------------------------------------------------------- coverage
@contextlib.contextmanager
def _no_init():
    """Builders without initialising their weights: coverage needs structure
    only (regnet_y_128gf's init alone takes minutes here)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _fused_parts(case) -> set:
    with _no_init():
        model = case.ours()
    return {(p.family, type(model.get_submodule(p.module)).__name__, p.op)
            for p in convkernels.explain(model).fused}


def test_every_builder_is_covered():
    """Every model builder has a case, and every fused part of every builder
    (its family, bound class, op and activation) is one a contract case exercises: the
    contract's representatives stand for the builders made of the same parts."""
    assert set(builder_names()) <= set(CASES), "builders without a contract case"
    exercised = set().union(*(_fused_parts(c) for c in CONTRACT))
    for case in CASES.values():
        parts = _fused_parts(case)
        assert parts, f"{case.name}: nothing fused"
        assert parts <= exercised, f"{case.name}: {sorted(parts - exercised)} not exercised"
