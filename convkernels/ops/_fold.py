"""Folding eval-mode BatchNorm into the preceding conv, with a cache.

``conv(x, w) + cb`` followed by ``(. - mean) * invstd * g + b`` equals
``conv(x, w * s) + (cb - mean) * s + b`` with ``s = g * invstd`` per output
channel. The folded weight is derived data: it is cached and recomputed when
any source tensor changes (its version counter moves, e.g. after
``optimizer.step()`` or ``load_state_dict``), so it is never stale, and it is
never written back into the parameters. The same cache keeps the other
derived weights of inference: oneDNN-prepacked conv weights (_conv.py) and
autocast's casts of parameters (_autocast.py).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from .primitives import acc_dtype

# More than the derived weights (folded, prepacked, cast) and the DenseNet layers'
# prepared calls of any model in the set (densenet201: 398 + 98).
_MAX_ENTRIES = 1024


class _FoldCache:
    """Values derived from tensors, keyed by the tensors' identity. An entry
    goes when one of its tensors dies (a refreshed folded weight drops its
    prepacked copy with it), else by LRU beyond _MAX_ENTRIES."""

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        # (key, weakref) of entries whose tensor died. Weakref callbacks may run
        # in the middle of any allocation, even under the lock, so they only
        # append here; the next get() drops the entries.
        self._dead: list = []

    @staticmethod
    def _signature(tensors):
        return tuple((None if t is None else (t._version, t.data_ptr(), t.dtype)) for t in tensors)

    def _drop_dead(self):
        while self._dead:
            key, ref = self._dead.pop()
            hit = self._entries.get(key)
            # The key's ids may have been reused by a newer entry: drop only this one.
            if hit is not None and any(r is ref for r in hit[0]):
                del self._entries[key]

    def get(self, tensors, kind, compute):
        """``compute()``, cached for the current contents of ``tensors`` (by
        identity and version counter); ``kind`` (hashable) names what is
        derived from them, so one tensor may have several derived values.

        Inference tensors (made under ``torch.inference_mode()``, e.g. the
        parameters of a model built there) have no version counter, so a
        value derived from one cannot be kept fresh: it is computed on every
        call. A value derived from normal tensors under inference mode is
        computed with inference mode off, so that the cached value is a normal
        tensor that later calls with autograd or no_grad can use."""
        if any(t is not None and t.is_inference() for t in tensors):
            return compute()
        key = tuple(id(t) for t in tensors) + (kind,)
        sig = self._signature(tensors)
        with self._lock:
            self._drop_dead()
            hit = self._entries.get(key)
            if hit is not None:
                refs, hit_sig, value = hit
                # ids can be reused after a tensor dies: check identity too.
                if hit_sig == sig and all((r is None and t is None) or (r is not None and r() is t)
                                          for r, t in zip(refs, tensors)):
                    self._entries.move_to_end(key)
                    return value
        with torch.inference_mode(False):  # a no-op outside inference mode
            value = compute()
        dead = self._dead

        def died(ref, key=key):
            dead.append((key, ref))

        refs = tuple(None if t is None else weakref.ref(t, died) for t in tensors)
        with self._lock:
            self._entries[key] = (refs, sig, value)
            self._entries.move_to_end(key)
            while len(self._entries) > _MAX_ENTRIES:
                self._entries.popitem(last=False)
        return value

    def __len__(self):
        with self._lock:
            self._drop_dead()
            return len(self._entries)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._dead.clear()


FOLD_CACHE = _FoldCache()
_CLEAR = [FOLD_CACHE.clear]  # and the caches built on it (fuse._prepared)


def on_clear(clear) -> None:
    """``clear()`` runs in :func:`clear_caches`."""
    _CLEAR.append(clear)


def clear_caches() -> None:
    """Forgets every cached derived weight (folded, prepacked, cast) and the
    prepared inference calls made from them: for a change the version counters
    do not show, e.g. a write through ``.data``."""
    for clear in _CLEAR:
        clear()


def bn_scale_shift(weight, bias, mean, invstd):
    """BatchNorm as ``x * scale + shift`` per channel, in invstd's dtype."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean.to(invstd.dtype) * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    return scale, shift


def _eval_bn(running_mean, running_var, weight, bias, eps, acc):
    return bn_scale_shift(weight, bias, running_mean.to(acc),
                          torch.rsqrt(running_var.to(acc) + eps))


def eval_scale_shift(running_mean, running_var, weight, bias, eps, acc):
    """Eval-mode BN as ``x * scale + shift`` with vectors in ``acc`` (cached:
    six small ops a call, as much as a batch-1 conv of a late DenseNet layer)."""

    def compute():
        with torch.no_grad():
            return _eval_bn(running_mean, running_var, weight, bias, eps, acc)

    sources = (running_mean, running_var, weight, bias)
    return FOLD_CACHE.get(sources, ("bn-eval", eps, acc), compute)


def folded_conv_params(conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps):
    """(weight, bias) of the conv with eval-mode BN folded in (cached)."""

    def compute():
        with torch.no_grad():
            acc = acc_dtype(conv_weight.dtype)
            scale, shift = _eval_bn(running_mean, running_var, bn_weight, bn_bias, eps, acc)
            if conv_bias is not None:
                shift = shift + conv_bias.to(acc) * scale
            w = (conv_weight.to(acc) * scale.view(-1, 1, 1, 1)).to(conv_weight.dtype)
            return w, shift

    sources = (conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias)
    return FOLD_CACHE.get(sources, ("bn-fold", eps), compute)
