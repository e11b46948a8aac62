"""CIFAR ResNet-50 (RepDistiller ``models/resnetv2.py``): 3x3 stride-1 stem, no max-pool, ``shortcut``/``linear``.

Not torchvision's ResNet-50 (``downsample``/``fc``, 7x7 stem, max-pool), which cannot load these checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import init_kaiming, install_taps, run_stages


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 with a projection ``shortcut`` (Sequential conv, BN) where shape changes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    """Four Bottleneck stages (planes 64/128/256/512, strides 1/2/2/2), adaptive avg-pool, ``linear``."""

    # RepDistiller's get_feat_modules(): the top-level modules an init stage trains (kdbench.models.feature_modules)
    FEATURE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_blocks: list[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        init_kaiming(self)  # zero_init_residual is False in the reference, so nothing else
        install_taps(self, 4)
        # the BN before each stage preact tap's ReLU (its output plus the shortcut is the preact): the last bn3
        self.preact_bn = {f"stage{i}_preact": f"layer{i}.{len(layer) - 1}.bn3"
                          for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), 1)}

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            layers.append(Bottleneck(self.in_planes, planes, stride if i == 0 else 1, is_last=(i == num_blocks - 1)))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.tap_stem(F.relu(self.bn1(self.conv1(x))))
        out = self.tap_pre_pool(run_stages(self, out, (self.layer1, self.layer2, self.layer3, self.layer4)))
        out = self.tap_pooled(torch.flatten(self.avgpool(out), 1))
        return self.linear(out)


@register_model(name="ResNet50")
def ResNet50(num_classes: int = 100, in_channels: int = 3) -> ResNet:  # noqa: N802 (RepDistiller's name)
    return ResNet([3, 4, 6, 3], num_classes, in_channels)
