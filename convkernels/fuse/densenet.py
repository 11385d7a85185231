"""torchvision's DenseNet family: ``_DenseBlock``, ``_Transition`` and the
``DenseNet`` top level (stem and head).

* ``_DenseBlock``: the shared-buffer block of ``models._dense_block`` (one
  feature buffer, per-channel batch statistics computed once, O(L) saved
  tensors, ``memory_efficient`` recompute) on the parameters of torchvision's
  own ``_DenseLayer``s. Where a layer cannot run inside it (a hook on the layer
  or one of its modules, a replaced class, another configuration) the block
  runs torchvision's loop instead: each plain layer as two ``bn_act_conv``
  (norm-relu-conv), the others as modules, so only what is observed runs
  unfused.
* ``_Transition``: BN-ReLU, 2x2 average pooling, then the 1x1 conv on the
  4x smaller pooled tensor (the pooling and a 1x1 conv commute), one autograd
  node that saves only its input; else the Sequential family's forward.
* ``DenseNet``: the stem conv0-norm0-relu0 as one ``conv_bn_act`` (with
  autograd one node saving only the input and the conv output), then pool0;
  the blocks and transitions called as modules; the head's norm5 + F.relu as
  one ``bn_act``. That runs ``features``' children here, not through
  ``features``, so anything that makes ``features`` observable (a hook: it sees
  norm5's output, not relu's) or not the plain Sequential sends the top level
  back to torchvision's forward.

On CPU a fused stem makes its input channels_last, and everything after it runs
in that layout (``fuse.layout``; densenet121 on a 2-core EPYC, 224x224: eval
batch 8 ~1.25x, train batch 16 ~1.25x). Values do not depend on the layout;
dropout masks do (F.dropout draws them in memory order), so training with
dropout keeps the caller's layout and a seed gives torchvision's masks.

Nothing here imports torchvision (the classes are registered by path), nor
``convkernels.models`` at import time: that package imports ``fuse`` itself.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend, ops
from ..nn._bn_state import bn_args, count_batch
from ..ops import _autocast, _checks
from ..ops._library import needs_grad
from ._guard import (act_blocker, blocker, bn_blocker, context_blocker, conv_blocker,
                     input_blocker, observed)
from ._parts import bn_act_conv, conv_bn_act
from ._registry import Family, Pattern, register
from .layout import cpu_trunk_layout
from .sequential import sequential_forward

_TV = "torchvision.models.densenet."
_STEM = ("conv0", "norm0", "relu0", "pool0")


# ------------------------------------------------------------------ the checks
def _pair(v) -> list:
    return [v, v] if isinstance(v, int) else list(v)


def _unit_blocker(bn, act, conv, cin: int, cout: int, kernel: int) -> Optional[str]:
    """norm -> ReLU -> conv as torchvision's DenseNet builds it: ``kernel`` x
    ``kernel``, stride 1, 'same' padding, no bias, cin -> cout channels. The
    context is checked once by the caller, not per unit."""
    why = conv_blocker(conv) or bn_blocker(bn) or act_blocker(act)
    if why:
        return why
    if type(act) is not nn.ReLU:
        return f"{type(act).__name__} is not ReLU"
    if (conv.bias is not None or list(conv.kernel_size) != [kernel, kernel]
            or list(conv.stride) != [1, 1] or list(conv.padding) != [kernel // 2] * 2
            or list(conv.dilation) != [1, 1] or conv.groups != 1 or conv.in_channels != cin
            or conv.out_channels != cout or bn.num_features != cin):
        return "is not configured as torchvision's"
    return None


def _batch_norm_count(x: Tensor, bns) -> Optional[str]:
    """BatchNorm's own error in training with one value per channel: left to
    torchvision's modules to raise."""
    if x.size(0) * x.size(2) * x.size(3) <= 1 and any(bn.training for bn in bns):
        return "one value per channel in training"
    return None


def _fused_input(x, weight) -> Optional[str]:
    """The input checks of a part that runs the shared machinery, whose backends
    know no reference composite."""
    why = input_blocker(x, weight)
    if why is None and backend.resolve(x.device) == "reference":
        return "the reference backend runs torchvision's computation"
    return why


# ------------------------------------------------------------------- the parts
def _db():
    """``models._dense_block``, imported on first use (``convkernels.models``
    imports ``fuse`` when it loads)."""
    from ..models import _dense_block

    return _dense_block


def _bn_cfg(bn: nn.BatchNorm2d):
    a = bn_args(bn)
    return _db().BNCfg(a.running_mean, a.running_var, a.training, a.momentum, bn.eps), a


def _layer_forward(layer: nn.Module, prev: list) -> Tensor:
    """torchvision's ``_DenseLayer.forward`` on a list of tensors without
    checkpointing, its two norm-relu-conv units fused."""
    out = bn_act_conv(torch.cat(prev, 1), layer.norm1, layer.relu1, layer.conv1)
    out = bn_act_conv(out, layer.norm2, layer.relu2, layer.conv2)
    if layer.drop_rate > 0:
        out = F.dropout(out, p=layer.drop_rate, training=layer.training)
    return out


# ----------------------------------------------------------------- dense block
def _layer_class(block: nn.Module) -> Optional[type]:
    """torchvision's ``_DenseLayer``, from the module that defines the block's class."""
    return getattr(sys.modules.get(type(block).__module__), "_DenseLayer", None)


def _layer_blocker(layer: nn.Module, layer_cls: Optional[type]) -> Optional[str]:
    if type(layer) is not layer_cls:
        return f"is {type(layer).__name__}, not _DenseLayer"
    return observed(layer)


def _block_blocker(block: nn.Module, x) -> Optional[str]:
    """Whether the whole block may run as one shared-buffer node (after the
    context check and with at least one layer)."""
    layers = list(block._modules.items())
    first = layers[0][1]
    if type(first) is not _layer_class(block):
        return f"{layers[0][0]} is {type(first).__name__}, not _DenseLayer"
    why = _fused_input(x, first.conv1.weight)
    if why:
        return why
    layer_cls = type(first)
    c0, k, mid = first.conv1.in_channels, first.conv2.out_channels, first.conv1.out_channels
    if x.size(1) != c0:
        return f"the input has {x.size(1)} channels, not {c0}"
    dropout = first.drop_rate > 0 and first.training
    for i, (name, layer) in enumerate(layers):
        why = (_layer_blocker(layer, layer_cls)
               or _unit_blocker(layer.norm1, layer.relu1, layer.conv1, c0 + i * k, mid, 1)
               or _unit_blocker(layer.norm2, layer.relu2, layer.conv2, mid, k, 3))
        if why:
            return f"{name} {why}"
        if layer.drop_rate != first.drop_rate or layer.training != first.training:
            return f"{name} differs from {layers[0][0]} in drop_rate or training mode"
    if dropout and x.device.type != "cpu":
        # Off the CPU F.dropout runs torch's fused kernel, which draws other masks.
        return "dropout off the CPU"
    return _batch_norm_count(x, [layer.norm1 for _, layer in layers])


def _run_block(layers: list, x: Tensor) -> Tensor:
    db = _db()
    impl = backend.resolve(x.device)
    norms = [(_bn_cfg(l.norm1), _bn_cfg(l.norm2)) for l in layers]
    first = layers[0]
    cfg = db.BlockCfg(first.conv1.in_channels, first.conv2.out_channels,
                      [n1[0] for n1, _ in norms], [n2[0] for _, n2 in norms],
                      first.drop_rate if first.training else 0.0,
                      any(l.memory_efficient for l in layers), impl)
    # Under autocast the convs' tensors (the buffer is every conv's input) are
    # cast as torch casts them; BN parameters and statistics are not.
    x, *convs = _autocast.conv_args(x, *(w for l in layers
                                         for w in (l.conv1.weight, l.conv2.weight)))
    params = []
    for l, cw1, cw2 in zip(layers, convs[0::2], convs[1::2]):
        params += [l.norm1.weight, l.norm1.bias, cw1, l.norm2.weight, l.norm2.bias, cw2]
    with _autocast.disabled(x):
        if needs_grad(x, *params):
            y = db.DenseBlockFunction.apply(cfg, x, *params)
        else:
            with torch.no_grad():
                y = db.block_forward(cfg, x, params, save=False)[0]
    for l, (n1, n2) in zip(layers, norms):
        count_batch(l.norm1, n1[1])
        count_batch(l.norm2, n2[1])
    return y


def dense_block_forward(block: nn.Module, init_features: Tensor) -> Tensor:
    if context_blocker() or not block._modules:
        return type(block).forward(block, init_features)
    if _block_blocker(block, init_features) is None:
        return _run_block(list(block._modules.values()), init_features)
    # torchvision's loop. A checkpointed layer (memory_efficient) runs as
    # torchvision's module: its recompute repeats all of its forward (norm1's
    # running statistics and batch count updated again), which the early stop
    # of a recompute around a fused op would not.
    layer_cls = _layer_class(block)
    features = [init_features]
    for layer in block._modules.values():
        if _layer_blocker(layer, layer_cls) is None and not (
                layer.memory_efficient and any(t.requires_grad for t in features)):
            features.append(_layer_forward(layer, features))
        else:
            features.append(layer(features))
    return torch.cat(features, 1)


# ------------------------------------------------------------------ transition
def _transition_blocker(t: nn.Module, x) -> Optional[str]:
    if tuple(t._modules) != ("norm", "relu", "conv", "pool"):
        return "its children are not norm, relu, conv, pool"
    norm, relu, conv, pool = t._modules.values()
    why = (_fused_input(x, getattr(conv, "weight", None))
           or _unit_blocker(norm, relu, conv, norm.num_features, conv.out_channels, 1))
    if why:
        return why
    if type(pool) is not nn.AvgPool2d:
        return f"pool is {type(pool).__name__}, not AvgPool2d"
    if (_pair(pool.kernel_size) != [2, 2] or _pair(pool.stride) != [2, 2]
            or _pair(pool.padding) != [0, 0] or pool.ceil_mode or not pool.count_include_pad
            or pool.divisor_override is not None):
        return "pool is not a 2x2 average pooling"
    return observed(pool) or _batch_norm_count(x, [norm])


def transition_forward(t: nn.Module, x: Tensor) -> Tensor:
    if context_blocker():
        return type(t).forward(t, x)
    if _transition_blocker(t, x) is not None:
        return sequential_forward(t, x)
    db = _db()
    bn_cfg, a = _bn_cfg(t.norm)
    cfg = db.TransitionCfg(bn_cfg, backend.resolve(x.device))
    x, cw = _autocast.conv_args(x, t.conv.weight)
    args = (x, t.norm.weight, t.norm.bias, cw)
    with _autocast.disabled(x):
        if needs_grad(*args):
            y = db.TransitionFunction.apply(cfg, *args)
        else:
            with torch.no_grad():
                y = db.transition_forward(cfg, *args)[0]
    count_batch(t.norm, a)
    return y


# ------------------------------------------------------------ stem, head, top
def _check_stem(x, cw, conv0: nn.Conv2d, norm0: nn.BatchNorm2d, training: bool) -> None:
    """conv_bn_act's argument checks (``cw``: conv0's weight as the conv gets
    it), before anything runs or is updated: the stem node raises its errors."""
    op = "conv_bn_act"
    _checks.check_input(op, x)
    _checks.check_conv_args(op, x, cw, None, conv0.groups)
    oh, ow = _checks.conv_output_size(op, x, cw, _pair(conv0.stride),
                                      _pair(conv0.padding), _pair(conv0.dilation))
    _checks.check_bn_args(op, x, norm0.running_mean, norm0.running_var, norm0.weight, norm0.bias,
                          training, channels=conv0.out_channels, count=x.size(0) * oh * ow,
                          names=("bn_weight", "bn_bias"))


def _stem_node(x: Tensor, conv0, norm0, pool0) -> Tensor:
    """max_pool(relu(norm0(conv0(x)))) as one autograd node saving x and conv0's output."""
    db = _db()
    bn_cfg, a = _bn_cfg(norm0)
    pool = (_pair(pool0.kernel_size), _pair(pool0.stride or pool0.kernel_size),
            _pair(pool0.padding), _pair(pool0.dilation), pool0.ceil_mode)
    x, cw = _autocast.conv_args(x, conv0.weight)
    _check_stem(x, cw, conv0, norm0, a.training)
    cfg = db.StemCfg(bn_cfg, list(conv0.stride), list(conv0.padding), list(conv0.dilation),
                     conv0.groups, pool, backend.resolve(x.device))
    with _autocast.disabled(x):
        y = db.StemFunction.apply(cfg, x, cw, norm0.weight, norm0.bias)
    count_batch(norm0, a)
    return y


def _dropout_active(features: nn.Module) -> bool:
    return any(getattr(layer, "drop_rate", 0) > 0 and layer.training
               for child in features._modules.values() for layer in child._modules.values())


def _stem(features: nn.Module, x: Tensor) -> Tensor:
    conv0, norm0, relu0, pool0 = (features._modules[n] for n in _STEM)
    if blocker(x, conv0, norm0, relu0) is not None:
        return pool0(conv_bn_act(x, conv0, norm0, relu0))
    if not _dropout_active(features):
        x = cpu_trunk_layout(x, conv0, norm0, relu0)
    if (type(relu0) is nn.ReLU and type(pool0) is nn.MaxPool2d and not pool0.return_indices
            and observed(pool0) is None and conv0.bias is None
            and backend.resolve(x.device) != "reference"
            and needs_grad(x, conv0.weight, norm0.weight, norm0.bias)):
        return _stem_node(x, conv0, norm0, pool0)
    return pool0(conv_bn_act(x, conv0, norm0, relu0))


def _head(norm5: nn.Module, x: Tensor) -> Tensor:
    """``F.relu(norm5(x))``, as torchvision's forward applies it (in place)."""
    if blocker(x, None, norm5, None) is None:
        a = bn_args(norm5)
        y = ops.bn_act(x, a.running_mean, a.running_var, norm5.weight, norm5.bias, a.training,
                       a.momentum, norm5.eps, "relu")
        count_batch(norm5, a)
        return y
    return F.relu(norm5(x), inplace=True)


def _features_shape(features) -> Optional[str]:
    if type(features) is not nn.Sequential:
        return f"features is {type(features).__name__}, not Sequential"
    names = tuple(features._modules)
    if names[:4] != _STEM or len(names) < 5 or names[-1] != "norm5":
        return "features is not conv0, norm0, relu0, pool0, ..., norm5"
    return None


def _features_blocker(features) -> Optional[str]:
    return _features_shape(features) or observed(features)


def densenet_forward(model: nn.Module, x: Tensor) -> Tensor:
    features = model.features
    if context_blocker() or _features_blocker(features) is not None:
        return type(model).forward(model, x)
    mods = list(features._modules.values())
    out = _stem(features, x)
    for m in mods[4:-1]:
        out = m(out)
    out = _head(mods[-1], out)
    out = F.adaptive_avg_pool2d(out, (1, 1))
    out = torch.flatten(out, 1)
    return model.classifier(out)


# ------------------------------------------------------------------- patterns
def _unit(prefix: str, m: nn.Module, norm: str, relu: str, conv: str) -> Pattern:
    """A norm-relu-conv unit for the report (conv names the conv after the act)."""
    return Pattern(*((prefix + n, getattr(m, n)) for n in (conv, norm, relu)))


def _block_patterns(block: nn.Module) -> list:
    layer_cls = _layer_class(block)
    patterns = []
    for name, layer in block._modules.items():
        if type(layer) is layer_cls:
            patterns += [_unit(f"{name}.", layer, "norm1", "relu1", "conv1"),
                         _unit(f"{name}.", layer, "norm2", "relu2", "conv2")]
    return patterns


def _transition_patterns(t: nn.Module) -> list:
    if tuple(t._modules) != ("norm", "relu", "conv", "pool"):
        return []
    return [_unit("", t, "norm", "relu", "conv")]


def _top_patterns(model: nn.Module) -> list:
    features = getattr(model, "features", None)
    if _features_shape(features) is not None:
        return []
    get = lambda n: (f"features.{n}", features._modules[n])  # noqa: E731
    return [Pattern(get("conv0"), get("norm0"), get("relu0")), Pattern(None, get("norm5"), None)]


register(_TV + "_DenseBlock", Family("densenet._DenseBlock", dense_block_forward, _block_patterns))
register(_TV + "_Transition", Family("densenet._Transition", transition_forward,
                                     _transition_patterns))
register(_TV + "DenseNet", Family("densenet.stem_head", densenet_forward, _top_patterns))
