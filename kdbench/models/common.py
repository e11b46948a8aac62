"""Building blocks every zoo model shares: canonical taps, the staged forward, RepDistiller's inits."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from kdbench.models.taps import Tap


def install_taps(model: nn.Module, num_stages: int) -> None:
    """Adds the canonical parameter-free taps as attributes ``tap_<name>`` and records their paths.

    Taps are plain attributes (never entries of an indexed Sequential), so state_dict keys are unchanged.
    """
    names = (
        ["stem"]
        + [f"stage{i}" for i in range(1, num_stages + 1)]
        + [f"stage{i}_preact" for i in range(1, num_stages + 1)]
        + ["pooled"]
    )
    for name in names:
        setattr(model, f"tap_{name}", Tap())
    model.feature_taps = {name: f"tap_{name}" for name in names}


def run_stages(model: nn.Module, x: torch.Tensor, stages: Iterable[nn.Module]) -> torch.Tensor:
    """Runs stages whose last block returns ``(out, preact)``; forward continues with the stage tap's output."""
    for i, stage in enumerate(stages, 1):
        x, preact = stage(x)
        getattr(model, f"tap_stage{i}_preact")(preact)
        x = getattr(model, f"tap_stage{i}")(x)
    return x


def init_kaiming(model: nn.Module) -> None:
    """RepDistiller's ResNet init: conv Kaiming-normal (fan_out, relu), BN 1/0, linear left at default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def init_msra_normal(model: nn.Module, linear_std: float | None) -> None:
    """RepDistiller's WRN/VGG/MobileNetV2 init: conv normal(0, sqrt(2/(k*k*out))), BN 1/0, linear bias 0.

    ``linear_std``: normal std for linear weights (VGG, MobileNetV2: 0.01); None keeps the default (WRN).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                m.weight.data.normal_(0, linear_std)
            m.bias.data.zero_()
