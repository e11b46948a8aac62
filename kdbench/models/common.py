"""Building blocks every zoo model shares: canonical taps, the staged forward, RepDistiller's inits."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from kdbench.models.taps import Tap


def install_taps(model: nn.Module, num_stages: int) -> None:
    """Adds the canonical parameter-free taps as attributes ``tap_<name>`` and records their paths.

    Besides the feature taps (``stem``, ``stageK``, ``stageK_preact``, ``pooled``) every model has two taps
    placed for layers that live inside the network (letKD's KD layers): ``last_stage_first_block`` (the
    output of the first block of the last stage, consumed by the rest of that stage) and ``pre_pool`` (the
    map that global pooling reads). Where a tap sees the same tensor as another (ResNet ``pre_pool`` and
    ``stage3``), it is still its own module, called after the other, so replacing hooks on both compose.
    Taps are plain attributes (never entries of an indexed Sequential), so state_dict keys are unchanged.
    """
    names = (
        ["stem"]
        + [f"stage{i}" for i in range(1, num_stages + 1)]
        + [f"stage{i}_preact" for i in range(1, num_stages + 1)]
        + ["pooled", "last_stage_first_block", "pre_pool"]
    )
    for name in names:
        setattr(model, f"tap_{name}", Tap())
    model.feature_taps = {name: f"tap_{name}" for name in names}


def run_stages(model: nn.Module, x: torch.Tensor, stages: Iterable[nn.Module]) -> torch.Tensor:
    """Runs Sequential stages whose last block returns ``(out, preact)``; forward continues with the stage tap's
    output. The last stage runs block by block so its first block's output passes ``tap_last_stage_first_block``."""
    stages = tuple(stages)
    for i, stage in enumerate(stages, 1):
        if i < len(stages):
            x, preact = stage(x)
        elif len(stage) == 1:  # a one-block stage (resnet8x4): its only block also returns the preact
            x, preact = stage[0](x)
            x = model.tap_last_stage_first_block(x)
        else:
            x, preact = run_first_block_tapped(stage, x, model.tap_last_stage_first_block)
        getattr(model, f"tap_stage{i}_preact")(preact)
        x = getattr(model, f"tap_stage{i}")(x)
    return x


def run_first_block_tapped(blocks: nn.Sequential, x: torch.Tensor, tap: nn.Module):
    """``blocks(x)`` with the first block's output passed through ``tap`` (whose return value feeds the rest)."""
    x = tap(blocks[0](x))
    for i in range(1, len(blocks)):
        x = blocks[i](x)
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
