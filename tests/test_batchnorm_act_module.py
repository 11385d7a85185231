"""BatchNormAct2d: a drop-in nn.BatchNorm2d + activation."""
import pytest
import torch
from torch import nn

from convkernels.nn import BatchNormAct2d

from harness import TARGET_IDS, TARGETS, assert_close, make, on


def _pair(momentum=0.1, affine=True, track=True, act="relu", device="cpu"):
    ref = nn.BatchNorm2d(6, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = BatchNormAct2d(6, momentum=momentum, affine=affine, track_running_stats=track, act=act).to(device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_state_dict_keys_match_batchnorm2d():
    ours, ref = _pair()
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert isinstance(ours, nn.BatchNorm2d)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_matches_batchnorm2d_then_act(target, momentum, track, affine):
    ours, ref = _pair(momentum, affine, track, "silu", target.device)
    for step in range(3):
        for mode in ("train", "eval"):
            ours.train(mode == "train")
            ref.train(mode == "train")
            x = make((3, 6, 4, 5), torch.float32, target.device, seed=step, offset=step)
            r = make((3, 6, 4, 5), torch.float32, target.device, seed=10 + step)
            with on(target):
                y = ours(x, residual=r)
            y_ref = nn.functional.silu(ref(x) + r)
            assert_close(y, y_ref.double(), torch.float32, "out", f"step {step} {mode}")
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        if a.is_floating_point():
            assert_close(a, b.double(), torch.float32, "out", name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_compile_fullgraph_block(target):
    """A conv block with residual compiles with no graph break, forward and
    backward, and matches eager."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn1 = BatchNormAct2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = BatchNormAct2d(4, act="relu")

        def forward(self, x):
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)

    block = Block().to(target.device)
    twin = Block().to(target.device)
    twin.load_state_dict(block.state_dict())
    x = make((2, 4, 6, 6), torch.float32, target.device, seed=3)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with on(target):
        torch._dynamo.reset()
        compiled = torch.compile(twin, fullgraph=True, dynamic=False)
        y_c = compiled(xs[0])
        y_c.sum().backward()
        y_e = block(xs[1])
        y_e.sum().backward()
    assert_close(y_c, y_e.double(), torch.float32, "out", "compiled out")
    assert_close(xs[0].grad, xs[1].grad.double(), torch.float32, "grad", "compiled grad x")
    for (name, a), b in zip(twin.named_parameters(), block.parameters()):
        assert_close(a.grad, b.grad.double(), torch.float32, "grad", name)
    assert_close(twin.bn1.running_var, block.bn1.running_var.double(), torch.float32, "out", "running_var")
