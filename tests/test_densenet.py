"""convkernels.models.densenet*: torchvision's model (class, module names,
weights) with the fuse.densenet family bound, giving the same numbers (eval,
train, gradients, running statistics), and the shared-buffer dense block's
memory: bytes saved for backward far below torchvision's.

Tolerances (DESIGN.md, Verification): relative error ||a - b|| / ||b|| of
outputs in fp32 <= 1e-4; gradients and running stats in float64 <= 1e-6.

torchvision's memory_efficient=True recomputes norm1 under checkpointing and so
updates its running statistics (and num_batches_tracked) twice per step; ours
updates them once, as memory_efficient=False does. The oracle is therefore
torchvision with memory_efficient=False for both of our modes (same
computation, only the saving strategy differs).
"""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

import convkernels  # noqa: E402
from convkernels import backend, models  # noqa: E402

ARCHS = ("densenet121", "densenet161", "densenet169", "densenet201")
SMALL = dict(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, bn_size=2,
             num_classes=7)
OUT_TOL = 1e-4  # fp32 outputs
GRAD_TOL = 1e-6  # float64 gradients and running statistics
TRITON_FP32_TOL = 1e-3  # fp32 training step on the triton backend, vs fp32 torchvision
# Under autocast (see test_autocast_matches_torchvision): outputs and running
# statistics against torchvision under the same autocast; gradients by their
# error against float64 torchvision, at most AMP_GRAD_RATIO times torchvision's
# own autocast error plus AMP_GRAD_FLOOR.
AMP_OUT_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
AMP_STATS_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
AMP_GRAD_RATIO = 1.5
AMP_GRAD_FLOOR = 5e-2

needs_cpu = pytest.mark.skipif(not backend.available("cpu", "cpu"), reason="convkernels._C not built")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_fused_backend():
    """Whole models at tiny sizes are dominated by per-op overhead; on a shared
    2-core machine two intra-op threads make them 10-100x slower (a thread
    spinning at each parallel region's barrier while its peer is descheduled)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    # The fused CPU path is under test whatever CONVKERNELS_BACKEND says
    # (test_reference_backend_matches_torchvision selects the reference itself).
    with convkernels.use_backend("cpu" if backend.available("cpu", "cpu") else "reference"):
        yield
    torch.set_num_threads(previous)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Random BN affine parameters and running statistics, so eval is meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@functools.lru_cache(maxsize=None)
def _cached_pair(arch: str, memory_efficient: bool, kw: tuple):
    """A seeded, randomised torchvision model and ours loaded from its state dict
    strictly (cached: initialising the big ones takes seconds on this CPU)."""
    kw = dict(kw)
    torch.manual_seed(0)
    if arch == "DenseNet":
        tv = torchvision.models.DenseNet(**kw)
        ours = models.DenseNet(memory_efficient=memory_efficient, **kw)
    else:
        tv = getattr(torchvision.models, arch)(**kw)
        ours = getattr(models, arch)(memory_efficient=memory_efficient, **kw)
    _randomise(tv)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return ours, tv


def _tv_state(arch: str, **kw):
    return _cached_pair(arch, False, tuple(sorted(kw.items())))[1].state_dict()


def _pair(arch: str, dtype=torch.float32, memory_efficient=False, **kw):
    """Fresh copies of (ours, torchvision) with identical weights."""
    ours, tv = _cached_pair(arch, memory_efficient, tuple(sorted(kw.items())))
    return copy.deepcopy(ours).to(dtype), copy.deepcopy(tv).to(dtype)


def _input(shape, dtype=torch.float64, seed=1, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _compare_train_step(ours, tv, x, seed=None, check_input_grad=True, tol=GRAD_TOL):
    """One training forward/backward of both (float64 unless x is not); compares
    output, the input's gradient, every parameter gradient and every buffer."""
    ours.train(), tv.train()
    xo = x.detach().clone().requires_grad_(check_input_grad)
    xt = x.detach().clone().requires_grad_(check_input_grad)
    if seed is not None:
        torch.manual_seed(seed)
    yo = ours(xo)
    if seed is not None:
        torch.manual_seed(seed)
    yt = tv(xt)
    assert rel(yo, yt) <= tol, f"train output: {rel(yo, yt):.3g}"
    g = _input(tuple(yt.shape), seed=99).to(yt.dtype)
    yo.backward(g)
    yt.backward(g)
    if check_input_grad:
        assert rel(xo.grad, xt.grad) <= tol, f"input grad: {rel(xo.grad, xt.grad):.3g}"
    tv_params = dict(tv.named_parameters())
    for name, p in ours.named_parameters():
        err = rel(p.grad, tv_params[name].grad)
        assert err <= tol, f"grad {name}: {err:.3g}"
    tv_state = tv.state_dict()
    for name, t in ours.state_dict().items():
        if t.is_floating_point():
            err = rel(t, tv_state[name])
            assert err <= tol, f"{name}: {err:.3g}"
        else:
            assert torch.equal(t, tv_state[name]), name
    return yo


# --------------------------------------------------------------- names, weights
@pytest.mark.parametrize("arch", ARCHS)
def test_module_names_match_torchvision(arch):
    ours, tv = _pair(arch)
    assert type(ours) is torchvision.models.DenseNet
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in tv.named_modules()]
    for (n, m), (_, t) in zip(ours.named_modules(), tv.named_modules()):
        if isinstance(t, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            assert type(m) is type(t), n


def _legacy_keys(state):
    """As the original checkpoints: denselayerN.norm.1.weight instead of
    norm1.weight, etc., and no num_batches_tracked (older than torch 0.4)."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|conv))([12])\.(.*)$")
    return {(f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if (m := pattern.match(k)) else k): v
            for k, v in state.items() if not k.endswith("num_batches_tracked")}


def test_weights_enum_and_names_load_through_torchvision(monkeypatch, tmp_path):
    """weights= takes the enum member or its names; the state dict goes through
    torchvision's _load_state_dict, which fixes the legacy 'norm.1' keys."""
    W = torchvision.models.DenseNet121_Weights
    state = _tv_state("densenet121")
    legacy = _legacy_keys(state)
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(legacy, path)
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return torch.load(path, weights_only=True)

    monkeypatch.setattr(W, "get_state_dict", fake_get_state_dict)
    for weights in (W.IMAGENET1K_V1, "IMAGENET1K_V1", "DenseNet121_Weights.IMAGENET1K_V1", "DEFAULT"):
        model = models.densenet121(weights=weights, num_classes=1000)
        got = model.state_dict()
        assert list(got) == list(state)
        for k, v in state.items():
            assert torch.equal(got[k], torch.zeros_like(v) if k.endswith("num_batches_tracked") else v), (weights, k)
    assert calls == [W.IMAGENET1K_V1] * 4
    with pytest.raises(ValueError):  # num_classes must match the weights' categories
        models.densenet121(weights=W.IMAGENET1K_V1, num_classes=10)
    with pytest.raises(Exception):  # another architecture's weights
        models.densenet121(weights=torchvision.models.DenseNet169_Weights.IMAGENET1K_V1)
    with pytest.raises(KeyError):
        models.densenet121(weights="IMAGENET1K_V9")


# ------------------------------------------------------------------- numerics
@needs_cpu
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_outputs_match_torchvision(arch):
    ours, tv = _pair(arch, num_classes=10)
    x = _input((2, 3, 32, 32), torch.float32)
    ours.eval(), tv.eval()
    with torch.no_grad():
        assert rel(ours(x), tv(x)) <= OUT_TOL
        assert rel(ours(x[:1]), tv(x[:1])) <= OUT_TOL  # batch 1 in eval
    # Training BN over 2 values per channel (the last block at 32x32) is
    # ill-conditioned in fp32 (~1e-1 between two correct orders of summation):
    # 64x64 gives the last block 2x2 pixels.
    x = _input((2, 3, 64, 64), torch.float32)
    ours.train(), tv.train()
    with torch.no_grad():
        assert rel(ours(x), tv(x)) <= OUT_TOL
    if arch == "densenet121":
        assert rel(ours(x), tv(x)) <= OUT_TOL  # with autograd recording


@needs_cpu
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep-bottleneck", "mem-eff"])
@pytest.mark.parametrize("arch", ARCHS)
def test_float64_train_step_matches_torchvision(arch, memory_efficient):
    """64x64: the last block sees 2x2 pixels (at 32x32 BN normalises 2 values per
    channel there, which even float64 resolves only to ~1e-6)."""
    ours, tv = _pair(arch, torch.float64, memory_efficient, num_classes=10)
    _compare_train_step(ours, tv, _input((2, 3, 64, 64)))


@needs_cpu
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep-bottleneck", "mem-eff"])
def test_dropout_matches_torchvision_under_same_seed(memory_efficient):
    """The dropout masks are drawn as F.dropout draws them (same RNG order, same
    layout), so a fixed seed gives torchvision's exact masks."""
    kw = dict(SMALL, drop_rate=0.3)
    ours, tv = _pair("DenseNet", torch.float64, memory_efficient, **kw)
    x = _input((3, 3, 32, 32))
    _compare_train_step(ours, tv, x, seed=123)
    ours.eval(), tv.eval()  # no dropout in eval
    with torch.no_grad():
        assert rel(ours(x), tv(x)) <= GRAD_TOL


@needs_cpu
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep-bottleneck", "mem-eff"])
def test_custom_config_and_channels_last(memory_efficient):
    ours, tv = _pair("DenseNet", torch.float64, memory_efficient, **SMALL)
    x = _input((2, 3, 36, 36), channels_last=True)
    block = ours.features.denseblock1
    seen = []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(o))
    _compare_train_step(ours, tv, x)
    handle.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert seen[0].shape[1] == 16 + 2 * 8


@needs_cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep-bottleneck", "mem-eff"])
def test_batch_chunks_match_torchvision(monkeypatch, memory_efficient, channels_last):
    """norm1-relu1-conv1 over the batch in chunks (the cpu backend's
    _batch_chunks), here one sample per chunk."""
    from convkernels.models import _dense_block

    x = _input((3, 3, 32, 32), channels_last=channels_last)
    monkeypatch.setattr(_dense_block, "_CHUNK_BYTES", 2 * x[0].numel() * x.element_size())
    assert [s.stop - s.start for s in _dense_block._batch_chunks(x, "cpu")] == [2, 1]
    monkeypatch.setattr(_dense_block, "_CHUNK_BYTES", 1)
    assert [s.stop - s.start for s in _dense_block._batch_chunks(x, "cpu")] == [1, 1, 1]
    ours, tv = _pair("DenseNet", torch.float64, memory_efficient, **SMALL)
    _compare_train_step(ours, tv, x)


@pytest.mark.skipif(not backend.available("triton", "cpu"), reason="triton not importable")
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep-bottleneck", "mem-eff"])
def test_triton_backend_matches_torchvision(memory_efficient):
    """The whole model on the triton backend (the interpreter on CPU: small
    shapes, fp32): eval outputs, and a training step's outputs, gradients and
    running statistics."""
    ours, tv = _pair("DenseNet", torch.float32, memory_efficient, **SMALL)
    x = _input((2, 3, 32, 32), torch.float32)
    with convkernels.use_backend("triton"):
        ours.eval(), tv.eval()
        with torch.no_grad():
            assert rel(ours(x), tv(x)) <= OUT_TOL
        _compare_train_step(ours, tv, x, tol=TRITON_FP32_TOL)


@needs_cpu
def test_densenet121_channels_last_fp32():
    ours, tv = _pair("densenet121", num_classes=10)
    x = _input((2, 3, 64, 64), torch.float32, channels_last=True)
    ours.eval(), tv.eval()
    with torch.no_grad():
        assert rel(ours(x), tv(x)) <= OUT_TOL
    ours.train(), tv.train()
    with torch.no_grad():
        assert rel(ours(x), tv(x)) <= OUT_TOL


# One of each kind of tensor a dense layer's prepared eval calls derive from
# (models/_dense_block._layer_plan): norm1's statistics and affine, conv1,
# norm2 (folded into conv1) and conv2.
LAYER_TENSORS = ("norm1.running_var", "norm1.weight", "conv1.weight", "norm2.running_mean",
                 "norm2.bias", "conv2.weight")


@needs_cpu
@pytest.mark.parametrize("name", LAYER_TENSORS)
def test_eval_layer_follows_tracked_writes_stale_through_data(name):
    """Eval without autograd (fp32, batch 1: the prepared layer calls) gives
    torchvision's numbers, follows an in-place write to any of a layer's
    tensors (the version counter moves), and, like every derived weight, stays
    stale after a write through ``.data`` until convkernels.clear_caches()."""
    ours, tv = _pair("DenseNet", torch.float32, False, **SMALL)
    ours.eval(), tv.eval()
    x = _input((1, 3, 32, 32), torch.float32, channels_last=True)
    layer = "features.denseblock2.denselayer2."
    t_ours, t_tv = (dict(m.named_parameters(), **dict(m.named_buffers()))[layer + name]
                    for m in (ours, tv))
    with torch.no_grad():
        before = ours(x)
        assert rel(before, tv(x)) <= OUT_TOL
        for t in (t_ours, t_tv):
            t.mul_(1.5)
        after = ours(x)
        assert rel(after, before) > 10 * OUT_TOL and rel(after, tv(x)) <= OUT_TOL
        t_ours.data.mul_(0.5)
        t_tv.mul_(0.5)
        assert torch.equal(ours(x), after)
        convkernels.clear_caches()
        assert rel(ours(x), tv(x)) <= OUT_TOL


@needs_cpu
def test_eval_mode_gradients():
    """Eval mode with autograd (running statistics in every BN) backprops too."""
    ours, tv = _pair("DenseNet", torch.float64, False, **SMALL)
    ours.eval(), tv.eval()
    x = _input((2, 3, 32, 32))
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), tv(xt)
    assert rel(yo, yt) <= GRAD_TOL
    g = _input(tuple(yt.shape), seed=5)
    yo.backward(g), yt.backward(g)
    assert rel(xo.grad, xt.grad) <= GRAD_TOL
    tv_params = dict(tv.named_parameters())
    for name, p in ours.named_parameters():
        assert rel(p.grad, tv_params[name].grad) <= GRAD_TOL, name


def test_reference_backend_matches_torchvision():
    ours, tv = _pair("DenseNet", torch.float64, False, **SMALL)
    with convkernels.use_backend("reference"):
        _compare_train_step(ours, tv, _input((2, 3, 32, 32)))


@needs_cpu
def test_several_steps_with_optimizer():
    """Three SGD steps: parameters and buffers stay with torchvision's."""
    ours, tv = _pair("DenseNet", torch.float64, True, **SMALL)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_t = torch.optim.SGD(tv.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x = _input((2, 3, 32, 32), seed=step)
        for m, opt in ((ours, opt_o), (tv, opt_t)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    tv_state = tv.state_dict()
    for name, t in ours.state_dict().items():
        assert rel(t, tv_state[name]) <= GRAD_TOL if t.is_floating_point() else torch.equal(t, tv_state[name]), name


@needs_cpu
@pytest.mark.parametrize("drop_rate", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep-bottleneck", "mem-eff"])
def test_block_with_a_hooked_layer_matches_torchvision(memory_efficient, drop_rate):
    """A hook on one layer sends its block to torchvision's loop (the other
    layers as two fused bn_act_conv each, or as torchvision's checkpointed
    modules when memory_efficient): a training step of the block gives
    torchvision's output, gradients, running statistics and dropout masks, and
    the hook sees torchvision's tensors."""
    kw = dict(SMALL, drop_rate=drop_rate)
    ours, tv = _pair("DenseNet", torch.float64, memory_efficient, **kw)
    for m in tv.modules():  # the oracle checkpoints too (its recompute updates norm1 again)
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = memory_efficient
    block, ref = ours.features.denseblock2.train(), tv.features.denseblock2.train()
    seen = {}
    for name, b in (("ours", block), ("tv", ref)):
        b.denselayer2.register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, (torch.cat(i[0], 1), o.clone())))
    x = _input((2, block.denselayer1.conv1.in_channels, 6, 6), seed=8)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = _input((2, block.denselayer1.conv1.in_channels + len(block) * SMALL["growth_rate"], 6, 6),
               seed=9)
    torch.manual_seed(5)
    y = block(xo)
    torch.manual_seed(5)
    yt = ref(xt)
    y.backward(g), yt.backward(g)
    assert rel(y, yt) <= GRAD_TOL and rel(xo.grad, xt.grad) <= GRAD_TOL
    for a, b in zip(seen["ours"], seen["tv"]):
        assert rel(a, b) <= GRAD_TOL
    tv_params = dict(ref.named_parameters())
    for name, p in block.named_parameters():
        assert rel(p.grad, tv_params[name].grad) <= GRAD_TOL, name
    tv_state = ref.state_dict()
    for name, t in block.state_dict().items():
        assert rel(t, tv_state[name]) <= GRAD_TOL if t.is_floating_point() else torch.equal(t, tv_state[name]), name


@needs_cpu
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keep-bottleneck", "mem-eff"])
def test_gradient_accumulation_matches_torchvision(memory_efficient):
    """Two micro-batches, two backward passes and no zero_grad in between: the
    accumulated gradients and the twice-updated running statistics are
    torchvision's."""
    ours, tv = _pair("DenseNet", torch.float64, memory_efficient, **SMALL)
    ours.train(), tv.train()
    for step in range(2):
        x = _input((2, 3, 32, 32), seed=10 + step)
        for m in (ours, tv):
            m(x).square().mean().backward()
    tv_params = dict(tv.named_parameters())
    for name, p in ours.named_parameters():
        assert rel(p.grad, tv_params[name].grad) <= GRAD_TOL, name
    tv_state = tv.state_dict()
    for name, t in ours.state_dict().items():
        assert rel(t, tv_state[name]) <= GRAD_TOL if t.is_floating_point() else torch.equal(t, tv_state[name]), name


# -------------------------------------------------------------------- autocast
def _autocast_run(model, x, g, dtype, train):
    """Forward (under autocast unless dtype is None) and backward of g; returns
    (output, input grad, all parameter gradients flattened, {child: output dtype})."""
    model.train(train)
    dtypes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: dtypes.__setitem__(n, o.dtype))
             for n, m in model.features.named_children()]
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = model(x)
    for h in hooks:
        h.remove()
    y.backward(g.to(y.dtype))
    for name, p in model.named_parameters():
        assert p.grad.dtype == p.dtype, name  # gradients reach the parameters in their dtype
    return y, x.grad, torch.cat([p.grad.flatten() for p in model.parameters()]), dtypes


@needs_cpu
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_matches_torchvision(dtype, train):
    """Under CPU autocast the convs run in the autocast dtype and BatchNorm in its
    input's, with float32 parameters and running statistics, as in torchvision:
    the same dtype for every block's and transition's output, the logits and
    the gradients, and the same numbers up to the low dtype's rounding.

    Each model rounds in its own order, and a ReLU input rounded across zero
    flips a whole gradient path (measured: one such element moved a block's
    fp16 input gradient 9e-2 away from float64's, in ours and torchvision
    alike), so gradients are judged by their distance to float64 torchvision
    against torchvision's own autocast distance. Batch 4 at 64x64: with fewer
    values per channel, training-mode gradients in bf16 are mostly rounding
    noise (20-100% from float64 at 2x32x32, torchvision's as ours)."""
    ours, tv = _pair("DenseNet", torch.float32, False, **SMALL)
    ref = _pair("DenseNet", torch.float64, False, **SMALL)[1]
    x = _input((4, 3, 64, 64), torch.float32)
    g = _input((4, SMALL["num_classes"]), torch.float32, seed=99)
    y, gx, gp, dtypes = _autocast_run(ours, x, g, dtype, train)
    y_tv, gx_tv, gp_tv, dtypes_tv = _autocast_run(tv, x, g, dtype, train)
    y_ref, gx_ref, gp_ref, _ = _autocast_run(ref, x.double(), g.double(), None, train)
    assert y.dtype == y_tv.dtype == dtype
    assert "denseblock1" in dtypes and "transition1" in dtypes
    assert dtypes == {n: dtypes_tv[n] for n in dtypes}
    assert rel(y, y_tv) <= AMP_OUT_TOL[dtype], f"output: {rel(y, y_tv):.3g}"
    for what, a, b, r in (("input grad", gx, gx_tv, gx_ref), ("parameter grads", gp, gp_tv, gp_ref)):
        assert a.dtype == b.dtype, what
        bound = AMP_GRAD_RATIO * rel(b, r) + AMP_GRAD_FLOOR
        assert rel(a, r) <= bound, f"{what}: {rel(a, r):.3g} from float64, bound {bound:.3g}"
    tv_state = tv.state_dict()
    for name, t in ours.state_dict().items():
        assert t.dtype == tv_state[name].dtype, name  # updated in place, never a cast copy
        if t.is_floating_point():
            assert rel(t, tv_state[name]) <= AMP_STATS_TOL[dtype], name
        else:
            assert torch.equal(t, tv_state[name]), name


# --------------------------------------------------------------- torch.compile
def _grad_errors(model, reference) -> dict:
    """Relative error of each parameter gradient, its norm floored at 1e-3 of
    the norm of all gradients: in training norm0's weight gradient vanishes in
    exact arithmetic (every consumer of norm0's channels normalises them per
    channel), so what fp32 leaves of it is rounding noise."""
    ref = dict(reference.named_parameters())
    floor = 1e-3 * torch.cat([p.grad.double().flatten() for p in ref.values()]).norm()
    return {name: ((p.grad.double() - ref[name].grad.double()).norm()
                   / ref[name].grad.double().norm().clamp_min(floor)).item()
            for name, p in model.named_parameters()}


@needs_cpu
@pytest.mark.parametrize("compiler, modes", [
    # aot_eager runs eager's kernels: the fp32 tolerances hold under autocast too.
    ("aot_eager", ("train", "eval", "train-no-grad", "eval-no-grad", "train-bf16")),
    ("inductor", ("train",)),  # ~100 s of C++ compilation per mode on a 2-core CPU
], ids=["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler, modes):
    """torch.compile(fullgraph=True) traces the model with no graph break (the
    dense block, transition and stem autograd Functions included, and under
    bf16 autocast) and matches eager over two micro-batches (gradients
    accumulated, running statistics updated twice, the second call reusing the
    compiled graph)."""
    for mode in modes:
        train, grad, amp = mode.startswith("train"), "no-grad" not in mode, "bf16" in mode
        eager = _pair("DenseNet", **SMALL)[0].train(train)
        twin = _pair("DenseNet", **SMALL)[0].train(train)
        torch._dynamo.reset()
        compiled = torch.compile(twin, fullgraph=True, backend=compiler, dynamic=False)
        for step in range(2):
            x = _input((2, 3, 32, 32), torch.float32, seed=20 + step)
            xc, xe = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=amp):
                y_c, y_e = compiled(xc), eager(xe)
            assert y_c.dtype == y_e.dtype, mode
            assert rel(y_c, y_e) <= OUT_TOL, f"{mode} step {step} output: {rel(y_c, y_e):.3g}"
            if grad:
                g = _input(tuple(y_e.shape), y_e.dtype, seed=30 + step)
                y_c.backward(g), y_e.backward(g)
                assert rel(xc.grad, xe.grad) <= OUT_TOL, f"{mode} input grad"
        if grad:
            for name, err in _grad_errors(twin, eager).items():
                assert err <= OUT_TOL, f"{mode} grad {name}: {err:.3g}"
        eager_state = eager.state_dict()
        for name, t in twin.state_dict().items():
            if t.is_floating_point():
                assert rel(t, eager_state[name]) <= OUT_TOL, f"{mode} {name}"
            else:
                assert torch.equal(t, eager_state[name]), f"{mode} {name}"


# ---------------------------------------------------------------------- memory
def _saved_activation_bytes(model, x):
    """Bytes of the unique storages saved for backward by one training forward,
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    del y
    return sum(storages.values())


def _design_bound(model, x, bottlenecks: bool) -> int:
    """What the shared-buffer design saves: the block buffers (+ the bottlenecks
    unless memory_efficient), the stem's input and conv output, each
    transition's pooled activation (a quarter of its input), the per-channel
    statistics (mean and var of every channel produced, once) and the
    classifier input; +1%."""
    n, _, h, w = x.shape
    b = x.element_size()
    stats = 0  # channels whose (mean, var) pair is kept
    total = x.numel() * b  # the image (saved by conv0)
    h, w = (h + 1) // 2, (w + 1) // 2  # conv0
    c0 = model.features.conv0.out_channels
    total += n * c0 * h * w * b  # conv0 output (relu and max-pool recomputed from it)
    stats += c0
    h, w = (h + 1) // 2, (w + 1) // 2  # pool0
    for name, block in model.features.named_children():
        if name.startswith("denseblock"):
            layers = list(block.values())
            channels = layers[0].conv1.in_channels + len(layers) * layers[0].conv2.out_channels
            bottleneck = layers[0].conv1.out_channels
            total += n * channels * h * w * b
            if bottlenecks:
                total += len(layers) * n * bottleneck * h * w * b
            stats += channels + len(layers) * bottleneck
        elif name.startswith("transition"):
            stats += block.norm.num_features
            h, w = h // 2, w // 2
            total += n * block.norm.num_features * h * w * b
    stats += model.features.norm5.num_features
    total += 2 * stats * 4 + n * model.classifier.in_features * b
    return int(total * 1.01)


@needs_cpu
def test_saved_bytes_far_below_torchvision():
    x = _input((2, 3, 64, 64), torch.float32)
    numbers = {}
    for me in (False, True):
        torch.manual_seed(0)
        tv = torchvision.models.densenet121(memory_efficient=me, num_classes=10).train()
        ours = models.densenet121(memory_efficient=me, num_classes=10).train()
        numbers[("torchvision", me)] = _saved_activation_bytes(tv, x)
        numbers[("ours", me)] = _saved_activation_bytes(ours, x)
        numbers[("bound", me)] = _design_bound(ours, x, bottlenecks=not me)
    print({f"{a}{'-memeff' if me else ''}": f"{v / 2**20:.2f} MiB" for (a, me), v in numbers.items()})
    for me in (False, True):
        assert numbers[("ours", me)] <= numbers[("bound", me)]
        assert numbers[("ours", me)] < 0.25 * numbers[("torchvision", me)]
    assert numbers[("ours", True)] < 0.1 * numbers[("torchvision", False)]
    assert numbers[("ours", True)] < numbers[("ours", False)]


@needs_cpu
def test_block_mechanism_no_cat_and_stats_once(monkeypatch):
    """Training forward + backward of a block: no aten.cat, one batch_stats per
    produced chunk (input + every layer but the last), one running-stat update
    per BN, and the buffer is the block's output."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from convkernels.models import _dense_block

    calls = {}

    class Counting:
        def __getattr__(self, name):
            calls[name] = calls.get(name, 0) + 1
            return getattr(torch.ops.convkernels, name)

    class NoCat(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten.cat.default, "torch.cat in the dense block"
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(_dense_block, "_ops", Counting())
    ours, tv = _pair("DenseNet", torch.float64, False, **SMALL)
    block, ref = ours.features.denseblock2, tv.features.denseblock2
    x = _input((2, block.denselayer1.conv1.in_channels, 6, 6), seed=8)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    with NoCat():
        y = block.train()(xo)
        y.backward(torch.ones_like(y))
    n_layers = len(block)
    assert calls["batch_stats"] == 1 + (n_layers - 1) + n_layers  # channels once + each norm2
    assert calls["update_running_stats"] == 2 * n_layers
    # conv2 into the buffer slice, conv1 into the saved-bottleneck allocation
    # (one chunk of the batch at this size)
    assert calls["bn_act_conv_out"] == 2 * n_layers
    yt = ref.train()(xt)
    yt.backward(torch.ones_like(yt))
    assert rel(y, yt) <= GRAD_TOL and rel(xo.grad, xt.grad) <= GRAD_TOL
