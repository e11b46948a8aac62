"""CIFAR ResNets (depth 6n+2) with RepDistiller's module tree.

Module names, Sequential indices, BN defaults and the init order follow HobbitLong/RepDistiller
``models/resnet.py`` so its ``ckpt_epoch_240.pth`` state dicts load with ``strict=True``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import init_kaiming, install_taps, run_stages


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, ReLU; the last block of a stage also returns the pre-ReLU sum."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + residual
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    """RepDistiller's CIFAR ResNet: stem at 32x32, three stages (strides 1/2/2), AvgPool2d(8), ``fc``."""

    # RepDistiller's get_feat_modules(): the top-level modules an init stage trains (kdbench.models.feature_modules)
    FEATURE_MODULES = ("conv1", "bn1", "relu", "layer1", "layer2", "layer3")

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n+2"
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        init_kaiming(self)
        install_taps(self, 3)
        # the BN before each stage preact tap's ReLU (its output plus the shortcut is the preact): the last bn2
        self.preact_bn = {f"stage{i}_preact": f"layer{i}.{len(layer) - 1}.bn2"
                          for i, layer in enumerate((self.layer1, self.layer2, self.layer3), 1)}

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            # Built before the block, as in RepDistiller, so a seeded init draws the same numbers.
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=(blocks == 1))]
        self.inplanes = planes * BasicBlock.expansion
        for i in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, is_last=(i == blocks - 1)))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.tap_stem(self.relu(self.bn1(self.conv1(x))))
        x = self.tap_pre_pool(run_stages(self, x, (self.layer1, self.layer2, self.layer3)))
        x = self.tap_pooled(torch.flatten(self.avgpool(x), 1))
        return self.fc(x)


_NARROW = [16, 16, 32, 64]  # stem / stage widths of resnet8..resnet110
_WIDE = [32, 64, 128, 256]  # the "x4" models


# RepDistiller's model_dict depths, plus resnet26 and the x4 depths that TAKD/DGKD teacher-assistant chains
# use (built with the same ResNet(depth, widths) constructor of HobbitLong/RepDistiller models/resnet.py, but not
# in its models/__init__.py model_dict; resnet26 is in DGKD's ResNet chain, Son et al., ICCV 2021).
for _depth in (8, 14, 20, 26, 32, 44, 56, 110):
    register_model(partial(ResNet, _depth, _NARROW), name=f"resnet{_depth}", family="resnet")
for _depth in (8, 14, 20, 26, 32):
    register_model(partial(ResNet, _depth, _WIDE), name=f"resnet{_depth}x4", family="resnet")
