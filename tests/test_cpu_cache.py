"""The CPU block cache of fused inference forwards (convkernels/_cpu_cache.py,
csrc/cpu/block_cache.cpp): freed blocks are reused inside a fused forward's
scope, held tensors never are, and the limit, flush and opt-out work."""
import os
import subprocess
import sys
import threading

import pytest
import torch
import torchvision

import convkernels
from convkernels import _cpu_cache, _extension

pytestmark = pytest.mark.skipif(not _extension.HAS_C, reason="convkernels._C is not built")

BIG = 1 << 18  # floats: 1 MiB, above the cache's 128 KiB floor


@pytest.fixture(autouse=True)
def _fresh_cache():
    old = convkernels.set_cpu_cache_limit(1 << 30)
    convkernels.clear_caches()
    yield
    convkernels.set_cpu_cache_limit(old)
    convkernels.clear_caches()


def _scope():
    with torch.no_grad():
        assert _cpu_cache.enter()
    return _cpu_cache


def test_installed_by_default():
    assert convkernels.cpu_cache_info()["installed"]


def test_freed_block_reused_in_scope_only():
    scope = _scope()
    try:
        a = torch.empty(BIG)
        ptr = a.data_ptr()
        del a
        b = torch.empty(BIG)
        assert b.data_ptr() == ptr
        held = torch.full((BIG,), 3.0)
        c = torch.empty(BIG)  # must not take a live tensor's block
        assert c.data_ptr() not in (b.data_ptr(), held.data_ptr())
        c.fill_(7.0)
        assert torch.equal(held, torch.full((BIG,), 3.0))
    finally:
        scope.exit()
    before = convkernels.cpu_cache_info()
    del b
    d = torch.empty(BIG)  # outside a scope: the previous allocator serves it
    assert convkernels.cpu_cache_info()["hits"] == before["hits"]
    del d


def test_nested_enter_is_refused_and_exit_without_enter_errors():
    scope = _scope()
    try:
        with torch.no_grad():
            assert not _cpu_cache.enter()
    finally:
        scope.exit()
    with pytest.raises(RuntimeError, match="cpu_cache_exit"):
        torch.ops.convkernels_C.cpu_cache_exit()


def test_no_scope_with_autograd():
    with torch.enable_grad():
        assert not _cpu_cache.enter()


def test_limit_and_flush_free_blocks():
    scope = _scope()
    try:
        del_me = torch.empty(BIG)
        del del_me
        assert convkernels.cpu_cache_info()["free_bytes"] >= BIG * 4
        convkernels.clear_caches()
        assert convkernels.cpu_cache_info()["free_bytes"] == 0
        convkernels.set_cpu_cache_limit(0)
        gone = torch.empty(BIG)
        del gone
        assert convkernels.cpu_cache_info()["free_bytes"] == 0
    finally:
        scope.exit()
    with pytest.raises(RuntimeError, match="limit"):
        convkernels.set_cpu_cache_limit(-1)


def _models():
    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    fused = convkernels.optimize(torchvision.models.resnet18().eval())
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_optimized_model_same_and_held_outputs_intact():
    ref, fused = _models()
    x = torch.randn(2, 3, 64, 64)
    kept = []
    fused.layer2.register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.no_grad():
        want = ref(x)
        want_mid = ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))
        outs = [fused(x) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    for mid in kept:  # feature maps a hook kept survive the later forwards
        torch.testing.assert_close(mid, want_mid, rtol=1e-4, atol=1e-4)
    info = convkernels.cpu_cache_info()
    with torch.no_grad():
        fused(x)
    assert convkernels.cpu_cache_info()["misses"] == info["misses"]  # steady state


def test_exception_inside_forward_closes_scope():
    _, fused = _models()
    with torch.no_grad(), pytest.raises(Exception):
        fused(torch.randn(2, 5, 32, 32))  # wrong channel count
    with torch.no_grad():
        assert _cpu_cache.enter()  # the failed forward left no scope open
    _cpu_cache.exit()


def test_threads_concurrently_match_reference():
    ref, fused = _models()
    xs = [torch.randn(2, 3, 64, 64) for _ in range(4)]
    with torch.no_grad():
        want = [ref(x) for x in xs]
    got, errors = [None] * 4, []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[i] = fused(xs[i])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_opt_out_env_leaves_allocator_alone():
    env = dict(os.environ, CONVKERNELS_CPU_CACHE="0")
    code = "import convkernels; print(convkernels.cpu_cache_info()['installed'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
