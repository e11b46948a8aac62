"""The model zoo behind a timm-style registry: ``create_model``, ``list_models``.

CIFAR models keep HobbitLong/RepDistiller's module tree, so its public CIFAR-100 checkpoints load with
``strict=True``; ImageNet models (``kdbench.models.imagenet``) keep torchvision's and mdistiller's, so their published
checkpoints do. Each architecture module registers its constructors on import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from kdbench.registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    base_lr: float  # the learning rate when this model is trained: RepDistiller's recipe; ImageNet: 0.1 at batch 256
    family: str  # the architecture family ("resnet": the CIFAR ResNets, "wrn", "vgg", ...), for rules that go by it
    input_size: int = 32  # the image side the architecture is built for: 32 (CIFAR), 64 (Tiny-ImageNet), 224 (ImageNet)


_MODELS: Registry[ModelEntry] = Registry("model")


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None, base_lr: float = 0.05,
                   family: str | None = None, input_size: int = 32):
    """Decorator: ``@register_model`` or ``@register_model(name="vgg8", base_lr=0.01, family="vgg")``; the family
    defaults to the name."""

    def register(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or constructor.__name__
        _MODELS.add(key, ModelEntry(key, constructor, base_lr, family or key, input_size))
        return constructor

    return register(fn) if fn is not None else register


def create_model(name: str, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """Builds zoo model ``name``; raises a one-line KdbenchError for unknown names."""
    return _MODELS.get(name).constructor(num_classes=num_classes, in_channels=in_channels)


def list_models(pattern: str = "*", input_size: int | None = None) -> list[str]:
    """Registered names matching ``pattern``; with ``input_size``, only models built for that image side
    (``list_models(input_size=32)``: the CIFAR zoo)."""
    names = _MODELS.names(pattern)
    return names if input_size is None else [n for n in names if _MODELS.get(n).input_size == input_size]


def model_entry(name: str) -> ModelEntry:
    return _MODELS.get(name)


def feature_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """The modules RepDistiller's ``get_feat_modules()`` returns for ``model``'s architecture (its class's
    ``FEATURE_MODULES``, module paths): what AB's and FSP's init stage trains, in train mode, while the rest of the
    student (the classifier, and WRN's final ``bn1``, MobileNetV2's ``conv2``, ShuffleV2's ``conv2``/``bn2``) stays in
    eval mode (``helper/pretrain.py::init``)."""
    return tuple(model.get_submodule(name) for name in type(model).FEATURE_MODULES)


# Registration happens on import; keep these imports at the bottom.
from kdbench.models import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: E402,F401

# isort: split
# The (Tiny-)ImageNet models register after the CIFAR zoo, so list_models() and unknown-model errors name CIFAR first.
from kdbench.models import imagenet, tinyimagenet  # noqa: E402,F401
