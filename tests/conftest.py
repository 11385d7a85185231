import os
import tempfile

import pytest
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


@pytest.fixture(autouse=True)
def _ieee_fp32_on_gpu():
    """The tests compare fp32 results with float64 references at fp32 tolerances:
    cuDNN's and cuBLAS's TF32 (cudnn.allow_tf32 is on by default) rounds the
    inputs to 10 mantissa bits, so it is off unless a test turns it on."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def pytest_configure(config):
    # pytest-xdist's own marker (--dist loadgroup keeps a group on one worker:
    # the tests sharing an expensive module fixture); declared here too so that
    # a run without xdist does not warn.
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one xdist worker")

    # pytest-xdist 3.8's --dist loadgroup tags each grouped test by setting an
    # attribute that pytest 9.2's structured test ids ignore: the groups then
    # silently split across workers, each building the group's fixtures again
    # (the AOT compile of every kernel twice at once). Stop with the fix instead.
    if config.getoption("dist", None) == "loadgroup" and _version(pytest.__version__) >= (9, 2):
        import xdist

        if _version(xdist.__version__) <= (3, 8):
            raise pytest.UsageError(
                f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} ignores "
                "xdist_group under --dist loadgroup: pip install 'pytest<9.2' (the Makefile's pin)")


# `make gpu` names a file here: each failure is appended as it is reported, so
# that a run cut short by its time box still says what failed and why (the
# summary at the end is lost when xdist is interrupted).
_FAILURE_LOG = os.environ.get("CONVKERNELS_FAILURE_LOG")


def pytest_runtest_logreport(report):
    if _FAILURE_LOG and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(_FAILURE_LOG, "a") as f:
            f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def _version(v):
    return tuple(int(p) for p in v.split(".")[:2])
