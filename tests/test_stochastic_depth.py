"""Stochastic depth on the ResNet family (optimize(stochastic_depth_prob=p)).

The reference is torchvision's unoptimized model whose blocks run a plain-torch
stochastic-depth forward drawing its mask at the same point from the same RNG
state, so both see the same masks.
"""
import copy
import math
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import convkernels
from convkernels.fuse import resnet as fuse_resnet
from model_checks import one_thread  # noqa: F401  (autouse fixture)

P = 0.5


def blocks(model):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def reference_forward(block, x, p):
    """torchvision's block with its branch scaled per sample in training
    (Huang et al.); eval keeps every branch unscaled."""
    keep = 1.0 - p
    scale = (torch.empty(x.size(0), dtype=x.dtype).bernoulli_(keep).div_(keep) if block.training
             else torch.ones(x.size(0), dtype=x.dtype))
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return block.relu(out * scale.view(-1, 1, 1, 1) + identity)


def pair(name, dtype=torch.float32):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)().to(dtype)
    opt = convkernels.optimize(ref, stochastic_depth_prob=P)
    bs = blocks(ref)
    for l, b in enumerate(bs, 1):
        b.forward = (lambda b, pl: lambda x: reference_forward(b, x, pl))(b, P * l / len(bs))
    return ref, opt


def seeded(model, x, seed=7):
    torch.manual_seed(seed)
    return model(x)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_train_matches_reference_with_the_same_masks(name):
    ref, opt = pair(name)
    x = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    ref.train(), opt.train()
    assert rel(seeded(opt, x), seeded(ref, x)) < 1e-4
    ref.eval(), opt.eval()
    with torch.no_grad():
        assert rel(opt(x), ref(x)) < 1e-4  # eval: the identity, no draws


def test_float64_grads_and_running_stats():
    ref, opt = pair("resnet18", torch.float64)
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with convkernels.use_backend("cpu"):
        for m in (ref, opt):
            m.train()
            xi = x.clone().requires_grad_()
            y = seeded(m, xi)
            (y * torch.randn(y.shape, dtype=y.dtype,
                             generator=torch.Generator().manual_seed(2))).sum().backward()
            m.x_grad = xi.grad
    assert rel(opt.x_grad, ref.x_grad) < 1e-6
    ref_params = dict(ref.named_parameters())
    for n, p in opt.named_parameters():
        assert rel(p.grad, ref_params[n].grad) < 1e-6, n
    ref_buffers = dict(ref.named_buffers())
    for n, b in opt.named_buffers():
        if b.is_floating_point():
            assert rel(b, ref_buffers[n]) < 1e-6, n


def test_unfused_path_applies_the_same_stochastic_depth():
    """A hook on a block's last conv sends its join to the modules: same output."""
    _, opt = pair("resnet18")
    hooked = copy.deepcopy(opt)
    for b in blocks(hooked):
        b.conv2.register_forward_hook(lambda m, a, out: None)
    x = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    opt.train(), hooked.train()
    assert rel(seeded(hooked, x), seeded(opt, x)) < 1e-5


def test_drop_frequency_per_block():
    _, opt = pair("resnet18")
    opt.train()
    n = 2000
    x = torch.empty(n, 1, 1, 1)
    bs = blocks(opt)
    for l, b in enumerate(bs, 1):
        p = P * l / len(bs)
        scale = fuse_resnet.drop_scale(b, x)
        dropped = int((scale == 0).sum())
        assert abs(dropped - n * p) < 5 * math.sqrt(n * p * (1 - p)), (l, dropped)
        assert torch.all((scale == 0) | (scale == 1 / (1 - p)))


def test_zero_is_torchvision_exactly_and_state_survives():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    torch.manual_seed(0)
    plain = convkernels.models.resnet18()
    torch.manual_seed(0)
    sd_model = convkernels.models.resnet18(stochastic_depth_prob=P)
    assert list(sd_model.state_dict()) == list(tv.state_dict())
    x = torch.randn(2, 3, 40, 40)
    fused = convkernels.optimize(tv)
    for m in (plain, fused):
        m.train()
    assert torch.equal(seeded(plain, x), seeded(fused, x))
    assert not any(fuse_resnet.SD_ATTR in b.__dict__ for b in blocks(plain))
    for clone in (pickle.loads(pickle.dumps(sd_model)), copy.deepcopy(sd_model)):
        assert ([b.stochastic_depth_prob for b in blocks(clone)]
                == [b.stochastic_depth_prob for b in blocks(sd_model)])
    assert blocks(sd_model)[-1].stochastic_depth_prob == P
    convkernels.optimize(sd_model, inplace=True)  # p = 0 removes it
    assert not any(fuse_resnet.SD_ATTR in b.__dict__ for b in blocks(sd_model))
    with pytest.raises(ValueError):
        convkernels.optimize(nn.Sequential(), stochastic_depth_prob=1.5)
