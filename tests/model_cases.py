"""Every model builder of ``convkernels.models`` paired with the model it must
equal: torchvision's builder of the same name, or for the seed architectures
torchvision lacks, the plain-torch module in tests/reference written from the
seeds (same module names, so state dicts load strictly).

A builder joins the model tests by having a case here: torchvision's names
join by themselves, a seed model by one line in ``SEED_CASES``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torchvision
from torch import nn

import convkernels
from convkernels import models
from reference import anynet as ref_anynet
from reference import highway as ref_highway
from reference import lenet as ref_lenet
from reference import nin as ref_nin
from reference import preact_resnet as ref_preact
from reference import simclr as ref_simclr

NUM_CLASSES = 10
# Functions in convkernels.models.__all__ that build a part, not a model.
NOT_MODELS = {"nin_block"}


@dataclass(frozen=True)
class ModelCase:
    name: str                              # the builder's name in convkernels.models
    ours: Callable[..., nn.Module]         # keyword arguments override the case's
    reference: Callable[..., nn.Module]
    sample: tuple                          # one input's (C, H, W)
    # torchvision's ModelTester: under torch.manual_seed(0) both builders give the
    # same parameters (only where the reference is the same builder).
    seeded: bool = False
    variants: tuple = field(default=({},))  # builder kwargs of the seeded / backprop check


# Smallest inputs whose last BatchNorm stage is still 2x2 (BN training over 2
# values per channel is ill-conditioned in fp32): /32 models at 64, alexnet's
# stride-4 stem too; inception_v3's valid convolutions need 107. inception_v3's
# aux head needs 299x299 in training, so its cases build it without one.
_TV_SIZE = {"inception_v3": 107}
_TV_KWARGS = {"inception_v3": {"aux_logits": False}}
_TV_VARIANTS = {name: ({}, {"memory_efficient": True})
                for name in ("densenet121", "densenet161", "densenet169", "densenet201")}


def _torchvision_case(name: str) -> ModelCase:
    kwargs = {"num_classes": NUM_CLASSES, **_TV_KWARGS.get(name, {})}
    return ModelCase(name, partial(getattr(models, name), **kwargs),
                     partial(torchvision.models.get_model_builder(name), **kwargs),
                     (3, _TV_SIZE.get(name, 64), _TV_SIZE.get(name, 64)),
                     seeded=True, variants=_TV_VARIANTS.get(name, ({},)))


# The seed models at reduced widths where their defaults are big; the default
# widths are what `python -m convkernels verify` checks.
SMALL_NIN = dict(widths=(8, 16, 24), first_conv=(5, 1, 2))
SMALL_ANYNET = (8, (1, 2), (16, 24), (8, 4), (0.5, 1.0))


def _preact(depth: int, p: float, width: int):
    return partial(getattr(models, f"preact_resnet{depth}"), num_classes=NUM_CLASSES,
                   stochastic_depth_prob=p, width=width), \
        partial(ref_preact.preact_resnet, depth, num_classes=NUM_CLASSES, width=width, p=p)


def _simclr_reference():
    encoder = ref_preact.preact_resnet(18, num_classes=NUM_CLASSES, width=8)
    encoder.fc = nn.Identity()
    return ref_simclr.SimCLR(encoder, 64, 16)


SEED_CASES = [
    ModelCase("lenet", models.lenet, ref_lenet.LeNet, (1, 28, 28)),
    ModelCase("lenet_bn", models.lenet_bn, partial(ref_lenet.LeNet, batch_norm=True), (1, 28, 28)),
    ModelCase("nin", partial(models.nin, **SMALL_NIN), partial(ref_nin.NiN, **SMALL_NIN),
              (1, 28, 28)),
    ModelCase("preact_resnet18", *_preact(18, 0.0, 8), (3, 32, 32)),
    ModelCase("preact_resnet34", *_preact(34, 0.2, 4), (3, 32, 32)),
    ModelCase("preact_resnet50", *_preact(50, 0.3, 4), (3, 32, 32)),
    ModelCase("preact_resnet101", *_preact(101, 0.0, 4), (3, 32, 32)),
    ModelCase("highway_net", partial(models.highway_net, width=8, depth=3),
              partial(ref_highway.HighwayNet, width=8, depth=3), (1, 28, 28)),
    ModelCase("anynet", partial(models.anynet, *SMALL_ANYNET),
              partial(ref_anynet.AnyNet, list(zip(*SMALL_ANYNET[1:])), SMALL_ANYNET[0]),
              (3, 32, 32)),
    ModelCase("regnetx32", models.regnetx32,
              partial(ref_anynet.AnyNet, [(4, 32, 16, 1), (6, 80, 16, 1)], 32, in_channels=1),
              (1, 32, 32)),
    ModelCase("simclr", partial(models.simclr, "preact_resnet18", 16, num_classes=NUM_CLASSES,
                                width=8),
              _simclr_reference, (3, 32, 32)),
]


def _small_vgg_head(model: nn.Module) -> nn.Module:
    """torchvision's VGG with its classifier (25088 -> 4096 -> 4096 -> classes:
    103M of vgg11_bn's 110M parameters, plain Linear/ReLU/Dropout that
    convkernels leaves alone) replaced by one of the same layers at width 64."""
    width, head = 64, model.classifier
    model.classifier = nn.Sequential(
        nn.Linear(head[0].in_features, width), nn.ReLU(True), nn.Dropout(),
        nn.Linear(width, width), nn.ReLU(True), nn.Dropout(), nn.Linear(width, head[-1].out_features))
    return model


def _optimized(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    return lambda **kwargs: convkernels.optimize(build(**kwargs), inplace=True)


def _vgg11_bn_head64(**kwargs) -> nn.Module:
    return _small_vgg_head(torchvision.models.vgg11_bn(**{"num_classes": NUM_CLASSES, **kwargs}))


# Representatives for the contract's default set, not builders: a fused family
# on a model whose unfused remainder is cut to size (the full builders are the
# cases above, run with CONVKERNELS_CONTRACT=all and by `verify`).
REDUCED_CASES = [
    ModelCase("vgg11_bn_head64", _optimized(_vgg11_bn_head64), _vgg11_bn_head64, (3, 64, 64),
              seeded=True),
]


def builder_names() -> list:
    """Every model builder ``convkernels.models`` exports."""
    return [n for n in models.__all__ if n not in NOT_MODELS and n[0].islower()
            and inspect.isfunction(getattr(models, n))]


def all_cases() -> list:
    tv = set(torchvision.models.list_models())
    return [_torchvision_case(n) for n in builder_names() if n in tv] + SEED_CASES


def image(case: ModelCase, n: int = 2, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *case.sample, generator=g, dtype=torch.float64).to(dtype)
