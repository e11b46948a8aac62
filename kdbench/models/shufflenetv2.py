"""ShuffleNetV2 for CIFAR (RepDistiller ``ShuffleV2`` = net_size 1: widths 116/232/464, head 1024).

RepDistiller applies no custom init here, so PyTorch's default layer init is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import install_taps, run_stages
from kdbench.models.shufflenetv1 import ShuffleBlock


class SplitBlock(nn.Module):
    """Splits channels at ``ratio``; parameter-free."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Keeps one half, transforms the other (1x1, dw3x3, 1x1), concatenates and shuffles.

    The last block of a stage also returns ``cat([x1, bn3 output])``: pre-ReLU and not shuffled.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = self.shuffle(torch.cat([x1, F.relu(pre)], 1))
        return (out, torch.cat([x1, pre], 1)) if self.is_last else out


class DownBlock(nn.Module):
    """Stride-2 block: left dw3x3-1x1, right 1x1-dw3x3-1x1, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """1x1 stem, stages ``[DownBlock, BasicBlock x n]``, head ``conv2``-``bn2``-ReLU, avg-pool(4), ``linear``."""

    # RepDistiller's get_feat_modules(): the top-level modules an init stage trains (kdbench.models.feature_modules)
    FEATURE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3")  # not conv2/bn2

    def __init__(self, out_channels: list[int], num_blocks: list[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        install_taps(self, 3)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels, is_last=(i == num_blocks - 1)) for i in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.tap_stem(F.relu(self.bn1(self.conv1(x))))
        out = run_stages(self, out, (self.layer1, self.layer2, self.layer3))
        out = self.tap_pre_pool(F.relu(self.bn2(self.conv2(out))))
        out = self.tap_pooled(torch.flatten(F.avg_pool2d(out, 4), 1))
        return self.linear(out)


@register_model(name="ShuffleV2", base_lr=0.01)
def ShuffleV2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:  # noqa: N802 (RepDistiller's name)
    return ShuffleNetV2([116, 232, 464, 1024], [3, 7, 3], num_classes=num_classes, in_channels=in_channels)
