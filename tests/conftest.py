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
