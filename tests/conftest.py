import os
import tempfile

import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. The
# variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches key on the traced graph, which names our public
# (composite) ops but not how they decompose: a fresh cache per run keeps
# compiled tests honest while the ops change.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="convkernels-inductor-"))

# `make test` runs the suite in several processes (pytest-xdist, one per core):
# each takes its share of the cores, since torch's default of one thread per
# core in every process oversubscribes them, and OpenMP's spinning threads then
# cost many times the work.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


def pytest_configure(config):
    # pytest-xdist's own marker (--dist loadgroup keeps a group on one worker:
    # the tests sharing an expensive module fixture); declared here too so that
    # a run without xdist does not warn.
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one xdist worker")
