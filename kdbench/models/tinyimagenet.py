"""Tiny-ImageNet models as mdistiller has them (``tiny_imagenet_model_dict`` at commit a08d46f).

mdistiller's DOT configs ``configs/tiny_imagenet/dot/r18_mv2.yaml`` and ``r18_shuv2.yaml`` pair a ResNet18 teacher
(its CIFAR ``resnetv2.ResNet18``: kdbench's ``ResNet18``) with this MobileNetV2 or with the CIFAR ``ShuffleV2``, on
64x64 images. kdbench's ``ShuffleV2`` keeps the CIFAR head, ``avg_pool2d(4)``, as mdistiller's does: at 64x64 its
8x8 last map pools to 2x2 and the flattened 4096 values do not fit ``linear`` (1024 inputs), so neither runs there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import install_taps

TINY_IMAGENET_SIZE = 64


class LinearBottleNeck(nn.Module):
    """pw-expand (also at t=1), dw 3x3, pw-linear in ``residual`` (convs with bias, at indices 0, 3, 6; BNs at 1, 4,
    7; ReLU6 at 2, 5); the input is added where stride and width stay."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, t: int = 6):
        super().__init__()
        hidden = in_channels * t
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1), nn.BatchNorm2d(out_channels),
        )
        self.stride, self.in_channels, self.out_channels = stride, in_channels, out_channels

    def forward(self, x):
        out = self.residual(x)
        return out + x if self.stride == 1 and self.in_channels == self.out_channels else out


def _stage(repeat: int, in_channels: int, out_channels: int, stride: int, t: int) -> nn.Sequential:
    blocks = [LinearBottleNeck(in_channels, out_channels, stride, t)]
    blocks += [LinearBottleNeck(out_channels, out_channels, 1, t) for _ in range(repeat - 1)]
    return nn.Sequential(*blocks)


class MobileNetV2TinyImageNet(nn.Module):
    """mdistiller's ``mdistiller/models/cifar/mv2_tinyimagenet.py`` (commit a08d46f), same module tree and keys.

    ``pre`` is a 1x1 conv with padding 1 (a 64x64 image gives 66x66 maps), ``stage1`` .. ``stage7`` (16, 24, 32, 64,
    96, 160, 320 channels; stride 2 in stages 2-4 only, so 9x9 at the end), ``conv1`` to 1280, and ``conv2``, a 1x1
    conv, as classifier. Weights keep PyTorch's default init, as mdistiller's (which sets none). ``in_channels`` is
    an argument (mdistiller: 3).

    Taps where mdistiller's ``feats`` are: ``stem`` after ``pre``; ``stage1`` .. ``stage3`` after ``stage2``,
    ``stage3``, ``stage4`` (linear bottlenecks: the preact taps get the same tensors); ``stage4`` after ``conv1``
    (ReLU6, out of place, so ``stage4_preact`` keeps ``conv1``'s BN output). ``last_stage_first_block`` after
    ``stage5[0]``, ``pre_pool`` = stage4, ``pooled`` the flattened average pool.
    """

    # the modules an init stage trains (kdbench.models.feature_modules): all but the classifier conv
    FEATURE_MODULES = ("pre", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "conv1")

    def __init__(self, num_classes: int = 200, in_channels: int = 3):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(in_channels, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        self.stage2 = _stage(2, 16, 24, 2, 6)
        self.stage3 = _stage(3, 24, 32, 2, 6)
        self.stage4 = _stage(4, 32, 64, 2, 6)
        self.stage5 = _stage(3, 64, 96, 1, 6)
        self.stage6 = _stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True))
        self.conv2 = nn.Conv2d(1280, num_classes, 1)
        install_taps(self, 4)
        self.preact_bn = {"stage1_preact": "stage2.1.residual.7", "stage2_preact": "stage3.2.residual.7",
                          "stage3_preact": "stage4.3.residual.7", "stage4_preact": "conv1.1"}

    def forward(self, x):
        x = self.tap_stem(self.pre(x))
        x = self.stage2(self.stage1(x))
        self.tap_stage1_preact(x)
        x = self.stage3(self.tap_stage1(x))
        self.tap_stage2_preact(x)
        x = self.stage4(self.tap_stage2(x))
        self.tap_stage3_preact(x)
        x = self.tap_last_stage_first_block(self.stage5[0](self.tap_stage3(x)))
        x = self.stage7(self.stage6(self.stage5[1:](x)))
        preact = self.conv1[1](self.conv1[0](x))
        self.tap_stage4_preact(preact)
        x = self.tap_pre_pool(self.tap_stage4(F.relu6(preact)))
        x = self.tap_pooled(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return torch.flatten(self.conv2(x[:, :, None, None]), 1)


@register_model(name="mobilenetv2_tinyimagenet", base_lr=0.2, family="mobilenetv2_tinyimagenet",
                input_size=TINY_IMAGENET_SIZE)  # mdistiller's Tiny-ImageNet configs: lr 0.2 at batch 256
def mobilenetv2_tinyimagenet(num_classes: int = 200, in_channels: int = 3) -> MobileNetV2TinyImageNet:
    return MobileNetV2TinyImageNet(num_classes, in_channels)
