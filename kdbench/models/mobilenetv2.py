"""MobileNetV2 for CIFAR (RepDistiller ``mobile_half``: expansion 6, width 0.5), registered as ``MobileNetV2``."""

from __future__ import annotations

import torch
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import init_msra_normal, install_taps, run_first_block_tapped

_FEATURE_BLOCKS = (1, 2, 4, 6)  # stage taps follow these entries of ``blocks``
# ``tap_last_stage_first_block`` follows the first InvertedResidual of this entry (80 ch at 2x2 for
# mobile_half): the first block of the last stage (blocks[5..6]), as letKD's MobileNetV2 config
# (adagorgun/letKD-framework CIFAR100/cross_model/RN50_MNv2/letKD-2.py, an 80-channel intermediate KD layer).
_LAST_STAGE_BLOCK = 5


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    """Sequential(conv (bias-free), BN, ReLU): ``conv1`` and ``conv2`` keys are ``.0`` and ``.1``."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """pw-expand, dw3x3, pw-linear in ``conv`` (weights at indices 0,1,3,4,6,7); the expand conv exists even at t=1."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """RepDistiller's CIFAR MobileNetV2: stride-2 stem (16x16), 7 ``blocks`` groups, 1x1 ``conv2`` to 1280.

    Stage features are linear bottlenecks (no ReLU), so the preact taps receive the same tensors.
    """

    # RepDistiller's get_feat_modules(): the top-level modules an init stage trains (kdbench.models.feature_modules)
    FEATURE_MODULES = ("conv1", "blocks")  # not conv2

    def __init__(self, num_classes: int = 100, in_channels: int = 3, expansion: int = 6, width_mult: float = 0.5):
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, input_channel, 3, 2)
        # (expansion t, channels c, repeats n, first stride s), channels before the width multiplier.
        setting = [(1, 16, 1, 1), (expansion, 24, 2, 1), (expansion, 32, 3, 2), (expansion, 64, 4, 2),
                   (expansion, 96, 3, 1), (expansion, 160, 3, 2), (expansion, 320, 1, 1)]
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)  # RepDistiller: AvgPool2d(input_size // 16) for 32x32
        init_msra_normal(self, linear_std=0.01)
        install_taps(self, len(_FEATURE_BLOCKS))
        # the BN that ends each stage (the pw-linear BN of its last block; plus the residual, it is the preact)
        self.preact_bn = {f"stage{i}_preact": f"blocks.{b}.{len(self.blocks[b]) - 1}.conv.7"
                          for i, b in enumerate(_FEATURE_BLOCKS, 1)}

    def forward(self, x):
        out = self.tap_stem(self.conv1(x))
        stage = 0
        for i, block in enumerate(self.blocks):
            if i == _LAST_STAGE_BLOCK:
                out = run_first_block_tapped(block, out, self.tap_last_stage_first_block)
            else:
                out = block(out)
            if i in _FEATURE_BLOCKS:
                stage += 1
                getattr(self, f"tap_stage{stage}_preact")(out)
                out = getattr(self, f"tap_stage{stage}")(out)
        out = self.tap_pre_pool(self.conv2(out))
        out = self.tap_pooled(torch.flatten(self.avgpool(out), 1))
        return self.classifier(out)


@register_model(name="MobileNetV2", base_lr=0.01)
def mobile_half(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, expansion=6, width_mult=0.5)
