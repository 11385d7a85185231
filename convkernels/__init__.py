"""convkernels: fused CNN kernels for PyTorch (Triton, CUDA C++, CPU C++).

>>> import convkernels
>>> y = convkernels.ops.bn_act(x, running_mean, running_var, weight, bias, training=True)
>>> block = convkernels.nn.BatchNormAct2d(64, act="relu")
"""
from . import _extension  # noqa: F401  (loads convkernels._C when built)
from . import fuse, nn, ops
from . import models
from .backend import get_backend, set_backend, use_backend
from .fuse import explain, optimize, unoptimize
from ._cpu_cache import cpu_cache_info, set_cpu_cache_limit
from .ops._fold import clear_caches

__version__ = "0.1.0"

__all__ = ["clear_caches", "cpu_cache_info", "explain", "fuse", "get_backend", "models", "nn", "ops", "optimize",
           "set_backend", "set_cpu_cache_limit", "unoptimize", "use_backend", "__version__"]
