"""Binding a fused forward on one module instance, reversibly.

``module.forward`` becomes an instance attribute (the class and every other
instance stay as they are). It is a small callable rather than a bound method:
a bound method in ``__dict__`` pickles as ``getattr(module, name)``, which would
unpickle as the class's forward, silently unfused. This one pickles and
deep-copies with its module (``__reduce__``), its function by qualified name.

``torch.jit.script`` compiles a module's class, and fails on a callable
instance attribute. It first calls ``__prepare_scriptable__`` on each module
it reaches and writes the results into the ``_modules`` dicts it walks, in
place. So every module of an optimized model holding a bound one gets that hook
(:func:`mark_scriptable`): it returns a copy of the module's whole subtree
(shallow copies: the same Parameter and buffer objects) without fused forwards,
and script compiles, and rewrites, only that copy: an optimized model scripts as
the model it was, and stays optimized.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

from torch import nn

from .. import _cpu_cache


class FusedForward:
    __slots__ = ("module", "fn")

    def __init__(self, module: nn.Module, fn: Callable):
        self.module = module
        self.fn = fn

    def __call__(self, *args, **kwargs):
        # The outermost fused forward of an inference call holds the CPU block
        # cache's scope for the whole call (``convkernels._cpu_cache``).
        if _cpu_cache.enter():
            try:
                return self.fn(self.module, *args, **kwargs)
            finally:
                _cpu_cache.exit()
        return self.fn(self.module, *args, **kwargs)

    def __reduce__(self):
        return (FusedForward, (self.module, self.fn))

    @property
    def __code__(self):
        """The original forward's code, for tools that name a module's forward
        by it (torch.export's input faking)."""
        return type(self.module).forward.__code__

    @property
    def __wrapped__(self):
        """The module's own forward: ``inspect.signature`` follows it, so tools
        that read forward's signature see the original one."""
        return type(self.module).forward.__get__(self.module)

    def __repr__(self) -> str:
        return f"<fused forward {self.fn.__module__}.{self.fn.__qualname__}>"


def unfused_copy(module: nn.Module) -> nn.Module:
    """The subtree of ``module`` as shallow copies (own ``__dict__`` and
    ``_modules``; shared parameters, buffers and hooks) without fused forwards
    or scripting hooks."""
    memo: dict = {}

    def copy_of(m):
        if id(m) not in memo:
            c = memo[id(m)] = copy.copy(m)
            if bound(c) is not None:
                del c.forward
            c.__dict__.pop("__prepare_scriptable__", None)
            c._modules = type(m._modules)(
                (k, None if v is None else copy_of(v)) for k, v in m._modules.items())
        return memo[id(m)]

    return copy_of(module)


class Unfused:
    """``module.__prepare_scriptable__``: :func:`unfused_copy` of the module."""
    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self) -> nn.Module:
        return unfused_copy(self.module)

    def __reduce__(self):
        return (Unfused, (self.module,))


def bound(module: nn.Module) -> Optional[FusedForward]:
    f = module.__dict__.get("forward")
    return f if isinstance(f, FusedForward) else None


def bind(module: nn.Module, fn: Callable) -> None:
    module.forward = FusedForward(module, fn)


def mark_scriptable(model: nn.Module) -> None:
    """Give every module of ``model`` that holds a bound one (itself included)
    the scripting hook; removes stale hooks elsewhere."""

    def visit(m: nn.Module) -> bool:
        holds = bound(m) is not None
        for child in m.children():
            holds = visit(child) or holds
        if holds:
            m.__prepare_scriptable__ = Unfused(m)
        else:
            m.__dict__.pop("__prepare_scriptable__", None)
        return holds

    visit(model)


def unbind(module: nn.Module) -> None:
    if bound(module) is not None:
        del module.forward
    if isinstance(module.__dict__.get("__prepare_scriptable__"), Unfused):
        del module.__prepare_scriptable__
