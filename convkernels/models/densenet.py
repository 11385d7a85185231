"""DenseNet-BC (Huang et al. 2017) on the fused ops, a drop-in for torchvision's.

Same builders (``densenet121/161/169/201(*, weights=None, progress=True,
**kwargs)``), same ``DenseNet`` constructor arguments and same module names, so
``model.load_state_dict(torchvision_model.state_dict(), strict=True)`` works and
``weights=`` takes torchvision's weight enums (or their names) and loads them
through torchvision's own loading code. Parameters live in ordinary
``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules; only ``forward`` differs:

* stem: ``conv_bn_act`` (conv0 + norm0 + relu0) then max pooling;
* dense blocks: one shared feature buffer per block, per-channel batch
  statistics computed once, one autograd node per block saving O(L) tensors
  (see ``_dense_block``); ``memory_efficient=True`` also drops the bottleneck
  outputs and recomputes them in backward;
* transitions: BN-ReLU, 2x2 average pooling, then the 1x1 conv on the pooled
  (4x smaller) tensor, as one autograd node that saves only its input;
* head: ``bn_act`` (norm5 + relu), global average pooling, classifier.

Under ``torch.autocast`` the convolutions run in the autocast dtype and
BatchNorm in its input's dtype, with float32 parameters and running
statistics, as in torchvision's model: the same dtypes throughout, float32
gradients for the float32 parameters (see ``ops._autocast``).

The ``reference`` backend runs the plain torch composite (torchvision's
computation) instead.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend, ops
from ..nn._bn_state import bn_args, count_batch
from ..ops import _autocast, _checks
from ..ops._library import needs_grad
from ._dense_block import (BlockCfg, BNCfg, DenseBlockFunction, StemCfg, StemFunction,
                           TransitionCfg, TransitionFunction, block_forward, transition_forward)

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201"]


def _bn_cfg(bn: nn.BatchNorm2d):
    a = bn_args(bn)
    return BNCfg(a.running_mean, a.running_var, a.training, a.momentum, bn.eps), a


def _pair(v) -> list:
    return [v, v] if isinstance(v, int) else list(v)


def _check_stem(x, cw, conv0: nn.Conv2d, norm0: nn.BatchNorm2d, training: bool) -> None:
    """conv_bn_act's argument checks (``cw``: conv0's weight as the conv gets
    it), before anything runs or is updated."""
    op = "conv_bn_act"
    _checks.check_input(op, x)
    _checks.check_conv_args(op, x, cw, None, conv0.groups)
    oh, ow = _checks.conv_output_size(op, x, cw, _pair(conv0.stride),
                                      _pair(conv0.padding), _pair(conv0.dilation))
    _checks.check_bn_args(op, x, norm0.running_mean, norm0.running_var, norm0.weight, norm0.bias,
                          training, channels=conv0.out_channels, count=x.size(0) * oh * ow,
                          names=("bn_weight", "bn_bias"))


def _batch_norm(x, bn: nn.BatchNorm2d):
    """``bn(x)`` as F.batch_norm with bn_args' arguments (counted by the caller)."""
    a = bn_args(bn)
    return F.batch_norm(x, a.running_mean, a.running_var, bn.weight, bn.bias, a.training,
                        a.momentum, bn.eps)


class _DenseLayer(nn.Module):
    """One BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 layer; torchvision's module names.

    Inside a block the layers are run by the block's fused kernel; calling a
    layer on its own (a tensor or a list of tensors, as in torchvision) gives
    its ``growth_rate`` new channels."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1,
                               bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def forward(self, input) -> Tensor:
        x = input if isinstance(input, Tensor) else torch.cat(list(input), 1)
        out = x
        for bn, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            a = bn_args(bn)
            out = ops.bn_act_conv(out, a.running_mean, a.running_var, bn.weight, bn.bias,
                                  a.training, a.momentum, bn.eps, "relu", conv.weight, conv.bias,
                                  conv.stride, conv.padding, conv.dilation, conv.groups)
            count_batch(bn, a)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                                bn_size=bn_size, drop_rate=drop_rate,
                                memory_efficient=memory_efficient)
            self.add_module("denselayer%d" % (i + 1), layer)
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.memory_efficient = memory_efficient

    def _reference(self, x: Tensor) -> Tensor:
        """torchvision's computation in plain torch (the reference backend)."""
        features = [x]
        for layer in self.values():
            cat = torch.cat(features, 1)
            z = layer.conv1(F.relu(_batch_norm(cat, layer.norm1)))
            new = layer.conv2(F.relu(_batch_norm(z, layer.norm2)))
            if layer.drop_rate > 0:
                new = F.dropout(new, p=layer.drop_rate, training=layer.training)
            features.append(new)
        return torch.cat(features, 1)

    def forward(self, init_features: Tensor) -> Tensor:
        x = init_features
        layers = list(self.values())
        if x.dim() != 4 or x.size(1) != self.num_input_features:
            raise ValueError(f"{type(self).__name__}: expected a [N, {self.num_input_features}, H, W] "
                             f"input, got shape {tuple(x.shape)}")
        impl = backend.resolve(x.device)
        norms = [(_bn_cfg(l.norm1), _bn_cfg(l.norm2)) for l in layers]
        if impl == "reference":
            y = self._reference(x)
        else:
            count = x.size(0) * x.size(2) * x.size(3)
            if count <= 1 and any(n1[1].training or n2[1].training for n1, n2 in norms):
                raise ValueError(f"Expected more than 1 value per channel when training, got input "
                                 f"size {tuple(x.shape)}")
            drop = layers[0].drop_rate if layers and layers[0].training else 0.0
            if any(l.drop_rate != layers[0].drop_rate or l.training != layers[0].training
                   for l in layers):
                raise ValueError("_DenseBlock: all layers must share drop_rate and training mode")
            cfg = BlockCfg(self.num_input_features, self.growth_rate,
                           [n1[0] for n1, _ in norms], [n2[0] for _, n2 in norms], drop,
                           self.memory_efficient, impl)
            if any(l.conv1.bias is not None or l.conv2.bias is not None for l in layers):
                raise ValueError("_DenseBlock: conv biases are not supported")
            # Under autocast the convs' tensors (the buffer is every conv's input)
            # are cast as torch casts them; BN parameters and statistics are not.
            x, *convs = _autocast.conv_args(x, *(w for l in layers
                                                 for w in (l.conv1.weight, l.conv2.weight)))
            params = []
            for l, cw1, cw2 in zip(layers, convs[0::2], convs[1::2]):
                params += [l.norm1.weight, l.norm1.bias, cw1, l.norm2.weight, l.norm2.bias, cw2]
            with _autocast.disabled(x):
                if needs_grad(x, *params):
                    y = DenseBlockFunction.apply(cfg, x, *params)
                else:
                    with torch.no_grad():
                        y, _ = block_forward(cfg, x, params, save=False)
        for l, (n1, n2) in zip(layers, norms):
            count_batch(l.norm1, n1[1])
            count_batch(l.norm2, n2[1])
        return y


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                              bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        impl = backend.resolve(x.device)
        bn_cfg, a = _bn_cfg(self.norm)
        if impl == "reference":
            y = self.pool(self.conv(F.relu(_batch_norm(x, self.norm))))
        else:
            cfg = TransitionCfg(bn_cfg, impl)
            x, cw = _autocast.conv_args(x, self.conv.weight)
            args = (x, self.norm.weight, self.norm.bias, cw)
            with _autocast.disabled(x):
                if needs_grad(*args):
                    y = TransitionFunction.apply(cfg, *args)
                else:
                    with torch.no_grad():
                        y = transition_forward(cfg, *args)[0]
        count_batch(self.norm, a)
        return y


class _Features(nn.Sequential):
    """torchvision's ``features`` (same children); ``forward(x)`` returns norm5's
    output as torchvision's does, ``forward(x, act="relu")`` fuses the head's relu."""

    def _stem(self, x: Tensor) -> Tensor:
        """conv0-norm0-relu0 fused (conv_bn_act), then pool0. With autograd on a
        native backend, one node that saves only x and conv0's output."""
        conv0, norm0, pool0 = self.conv0, self.norm0, self.pool0
        bn_cfg, a = _bn_cfg(norm0)
        impl = backend.resolve(x.device)
        if (impl != "reference" and conv0.bias is None
                and needs_grad(x, conv0.weight, norm0.weight, norm0.bias)):
            pool = (_pair(pool0.kernel_size), _pair(pool0.stride or pool0.kernel_size),
                    _pair(pool0.padding), _pair(pool0.dilation), pool0.ceil_mode)
            x, cw = _autocast.conv_args(x, conv0.weight)
            _check_stem(x, cw, conv0, norm0, a.training)
            cfg = StemCfg(bn_cfg, list(conv0.stride), list(conv0.padding), list(conv0.dilation),
                          conv0.groups, pool, impl)
            with _autocast.disabled(x):
                y = StemFunction.apply(cfg, x, cw, norm0.weight, norm0.bias)
        else:
            y = ops.conv_bn_act(x, conv0.weight, conv0.bias, a.running_mean, a.running_var,
                                norm0.weight, norm0.bias, a.training, a.momentum, norm0.eps,
                                conv0.stride, conv0.padding, conv0.dilation, conv0.groups, "relu")
            y = pool0(y)
        count_batch(norm0, a)
        return y

    def forward(self, x: Tensor, act: str = "identity") -> Tensor:
        x = self._stem(x)
        for name, module in self.named_children():
            if name in ("conv0", "norm0", "relu0", "pool0", "norm5"):
                continue
            x = module(x)
        norm5 = self.norm5
        a = bn_args(norm5)
        x = ops.bn_act(x, a.running_mean, a.running_var, norm5.weight, norm5.bias, a.training,
                       a.momentum, norm5.eps, act)
        count_batch(norm5, a)
        return x


class DenseNet(nn.Module):
    r"""Densenet-BC model class, as ``torchvision.models.DenseNet`` (same
    arguments, same module names, same initialisation).

    Args:
        growth_rate (int) - how many filters to add each layer (`k` in paper)
        block_config (list of ints) - how many layers in each pooling block
        num_init_features (int) - the number of filters to learn in the first convolution layer
        bn_size (int) - multiplicative factor for number of bottle neck layers
          (i.e. bn_size * k features in the bottleneck layer)
        drop_rate (float) - dropout rate after each dense layer
        num_classes (int) - number of classification classes
        memory_efficient (bool) - if True, the bottleneck (conv1) outputs are not
          kept for backward but recomputed (minimum memory). Either way a block
          keeps one shared feature buffer, not the per-layer concatenations.
    """

    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000, memory_efficient: bool = False) -> None:
        super().__init__()
        self.features = _Features(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features,
                                bn_size=bn_size, growth_rate=growth_rate, drop_rate=drop_rate,
                                memory_efficient=memory_efficient)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features,
                                    num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self._dropout = drop_rate > 0
        self.classifier = nn.Linear(num_features, num_classes)

        # Official init from torch repo (as torchvision).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and not (self.training and self._dropout)
                and backend.resolve(x.device) != "reference"):
            # On CPU the model runs channels_last inside: oneDNN's convolutions
            # then skip their NCHW reorders (densenet121 on a 2-core EPYC, 224x224:
            # eval batch 8 ~1.25x, train batch 16 ~1.25x). The logits and the
            # gradients do not depend on it; dropout masks would (they are drawn
            # in memory order, as torchvision's are), so training with dropout
            # keeps the caller's layout and a seed gives torchvision's masks.
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.features(x, act="relu")
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# --------------------------------------------------------------------- builders
_CONFIGS = {
    "densenet121": (32, (6, 12, 24, 16), 64, "DenseNet121_Weights"),
    "densenet161": (48, (6, 12, 36, 24), 96, "DenseNet161_Weights"),
    "densenet169": (32, (6, 12, 32, 32), 64, "DenseNet169_Weights"),
    "densenet201": (32, (6, 12, 48, 32), 64, "DenseNet201_Weights"),
}


def _densenet(arch: str, weights, progress: bool, kwargs: dict) -> DenseNet:
    growth_rate, block_config, num_init_features, enum_name = _CONFIGS[arch]
    if "pretrained" in kwargs:  # torchvision's legacy interface
        pretrained = kwargs.pop("pretrained")
        warnings.warn("The parameter 'pretrained' is deprecated, please use 'weights' instead.",
                      UserWarning, stacklevel=3)
        if pretrained and weights is None:
            weights = "IMAGENET1K_V1"
    # torchvision passes these positionally (a duplicate is a TypeError there);
    # here a keyword overrides the architecture's value.
    kwargs.setdefault("growth_rate", growth_rate)
    kwargs.setdefault("block_config", block_config)
    kwargs.setdefault("num_init_features", num_init_features)
    if weights is None:
        return DenseNet(**kwargs)
    try:
        from torchvision.models import densenet as tv_densenet
        from torchvision.models._utils import _ovewrite_named_param
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"{arch}(weights=...) loads torchvision's weights and needs torchvision "
                          f"installed ({e})") from e
    # verify() takes the enum member or its name ("IMAGENET1K_V1" or
    # "DenseNet121_Weights.IMAGENET1K_V1") and rejects another model's weights.
    weights = getattr(tv_densenet, enum_name).verify(weights)
    _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = DenseNet(**kwargs)
    # torchvision's loader: downloads, checks the hash and fixes the legacy
    # "norm.1"-style keys of the original checkpoints.
    tv_densenet._load_state_dict(model=model, weights=weights, progress=progress)
    return model


def densenet121(*, weights=None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """Densenet-121 (`Densely Connected Convolutional Networks
    <https://arxiv.org/abs/1608.06993>`_), as ``torchvision.models.densenet121``.

    Args:
        weights: None, a ``torchvision.models.DenseNet121_Weights`` member or its
            name (``"IMAGENET1K_V1"``, ``"DenseNet121_Weights.IMAGENET1K_V1"``,
            ``"DEFAULT"``); loaded with torchvision's loader.
        progress: show a download progress bar.
        **kwargs: passed to :class:`DenseNet` (memory_efficient, drop_rate,
            num_classes, growth_rate, block_config, num_init_features, bn_size).
    """
    return _densenet("densenet121", weights, progress, kwargs)


def densenet161(*, weights=None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """Densenet-161, as ``torchvision.models.densenet161`` (see :func:`densenet121`)."""
    return _densenet("densenet161", weights, progress, kwargs)


def densenet169(*, weights=None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """Densenet-169, as ``torchvision.models.densenet169`` (see :func:`densenet121`)."""
    return _densenet("densenet169", weights, progress, kwargs)


def densenet201(*, weights=None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """Densenet-201, as ``torchvision.models.densenet201`` (see :func:`densenet121`)."""
    return _densenet("densenet201", weights, progress, kwargs)
