"""Binding a fused forward on one module instance, reversibly.

``module.forward`` becomes an instance attribute (the class and every other
instance stay as they are). It is a small callable rather than a bound method:
a bound method in ``__dict__`` pickles as ``getattr(module, name)``, which would
unpickle as the class's forward, silently unfused. This one pickles and
deep-copies with its module (``__reduce__``), its function by qualified name.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn


class FusedForward:
    __slots__ = ("module", "fn")

    def __init__(self, module: nn.Module, fn: Callable):
        self.module = module
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    def __reduce__(self):
        return (FusedForward, (self.module, self.fn))

    @property
    def __wrapped__(self):
        """The module's own forward: ``inspect.signature`` follows it, so tools
        that read forward's signature see the original one."""
        return type(self.module).forward.__get__(self.module)

    def __repr__(self) -> str:
        return f"<fused forward {self.fn.__module__}.{self.fn.__qualname__}>"


def bound(module: nn.Module) -> Optional[FusedForward]:
    f = module.__dict__.get("forward")
    return f if isinstance(f, FusedForward) else None


def bind(module: nn.Module, fn: Callable) -> None:
    module.forward = FusedForward(module, fn)


def unbind(module: nn.Module) -> None:
    if bound(module) is not None:
        del module.forward
