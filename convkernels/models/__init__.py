"""The architecture set on the fused ops.

torchvision's builders followed by ``convkernels.optimize`` (same names, kwargs,
``weights=``, classes and state dicts), and the seed architectures torchvision
lacks (plain-torch modules from the seeds, optimized). Several builders share
their module's name, so the names come from each module's ``__all__``.
"""
import importlib

from .anynet import *  # noqa: F401,F403
from .densenet import *  # noqa: F401,F403
from .efficientnet import *  # noqa: F401,F403
from .googlenet import *  # noqa: F401,F403
from .highway import *  # noqa: F401,F403
from .lenet import *  # noqa: F401,F403
from .nin import *  # noqa: F401,F403
from .preact_resnet import *  # noqa: F401,F403
from .regnet import *  # noqa: F401,F403
from .resnet import *  # noqa: F401,F403
from .simclr import *  # noqa: F401,F403
from .vgg import *  # noqa: F401,F403

_TORCHVISION = ("densenet", "resnet", "googlenet", "vgg", "efficientnet", "regnet")
_SEEDS = ("lenet", "nin", "preact_resnet", "highway", "anynet", "simclr")
__all__ = [name for module in _TORCHVISION + _SEEDS
           for name in importlib.import_module(f"{__name__}.{module}").__all__]
