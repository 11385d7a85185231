"""convkernels.clear_caches(): the one fix for a change the cached derived
weights (folded, prepacked, cast; ops/_fold.py) cannot see. They refresh when a
source tensor's version counter moves; a write through ``.data`` does not
move it, so the result stays stale until clear_caches()."""
import pytest
import torch

import convkernels
from convkernels.nn import BNActConv2d, ConvBNAct2d
from convkernels.ops import _fold

from harness import TARGET_IDS, TARGETS, assert_close, make, on, randomise_state

# (module, the tensor written through .data, autocast dtype or None). Each
# covers one cached derivation: conv_bn_act's folded weights (and on CPU,
# channels_last, their prepacked copy), bn_act_conv's eval BN scale/shift,
# autocast's cast of a parameter.
CASES = {
    "conv_bn_act-conv.weight": (lambda: ConvBNAct2d(4, 6, 3, padding=1), "conv.weight", None),
    "conv_bn_act-running_var": (lambda: ConvBNAct2d(4, 6, 3, padding=1), "bn.running_var", None),
    "bn_act_conv-bn.weight": (lambda: BNActConv2d(4, 6, 3, padding=1), "bn.weight", None),
    "autocast-conv.weight": (lambda: ConvBNAct2d(4, 6, 3, padding=1), "conv.weight",
                             torch.bfloat16),
}


def _tensor(m, name):
    return dict(m.named_parameters(), **dict(m.named_buffers()))[name]


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES)
def test_write_through_data_is_stale_until_clear_caches(target, layout, case):
    build, name, amp = CASES[case]
    if amp is not None and target.small:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    m = build().to(target.device).eval()
    randomise_state(m)
    x = make((2, 4, 6, 5), torch.float32, target.device, layout)

    def run(backend):
        with convkernels.use_backend(backend), torch.no_grad(), \
                torch.autocast(target.device, amp or torch.bfloat16, enabled=amp is not None):
            return m(x)

    before = run(target.backend)
    assert len(_fold.FOLD_CACHE) > 0
    _tensor(m, name).data.mul_(1.5)  # does not move the version counter
    assert torch.equal(run(target.backend), before)  # stale: the documented limitation
    convkernels.clear_caches()
    assert len(_fold.FOLD_CACHE) == 0
    # After clear_caches: under autocast the reference backend runs on the cached cast too.
    expected = run("reference")
    assert not torch.equal(expected, before)
    after = run(target.backend)
    tol = "grad" if amp is None else "out"
    assert_close(after.float(), expected.double() if amp is None else expected.float(),
                 amp or torch.float32, tol, "after clear_caches")


def _under_no_grad(w):
    with torch.no_grad():
        w.mul_(1.5)


def _through_detach(w):
    w.detach().mul_(1.5)


def _under_inference_mode(w):
    with torch.inference_mode():
        w.mul_(1.5)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("write", [_under_no_grad, _through_detach, _under_inference_mode],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_tracked_writes_refresh_without_clear_caches(target, write):
    """In-place writes that move the version counter (optimizer.step() and
    load_state_dict() are such writes) refresh the cached weights."""
    m = ConvBNAct2d(4, 6, 3, padding=1).to(target.device).eval()
    randomise_state(m)
    x = make((2, 4, 6, 5), torch.float32, target.device, "channels_last")
    with on(target), torch.no_grad():
        before = m(x)
    write(m.conv.weight)
    with convkernels.use_backend("reference"), torch.no_grad():
        expected = m(x)
    with on(target), torch.no_grad():
        after = m(x)
    assert not torch.equal(after, before)
    assert_close(after, expected.double(), torch.float32, "grad", "after the write")
