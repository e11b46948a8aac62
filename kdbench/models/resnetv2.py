"""CIFAR ResNet-50 (RepDistiller ``models/resnetv2.py``) and ResNet-18 (the same file in mdistiller,
``mdistiller/models/cifar/resnetv2.py`` at commit a08d46f): 3x3 stride-1 stem, no max-pool, ``shortcut``/``linear``.

Not torchvision's ResNets (``downsample``/``fc``, 7x7 stem, max-pool; ``kdbench.models.imagenet``), which cannot load
these checkpoints. ResNet18 is mdistiller's Tiny-ImageNet teacher (``tiny_imagenet_model_dict``, the DOT configs
``configs/tiny_imagenet/dot/r18_*.yaml``), which it runs on 64x64 images: stage 4 at 8x8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import init_kaiming, install_taps, run_stages


def _shortcut(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """Identity (an empty Sequential) or a projection (1x1 conv, BN) where the block changes the shape."""
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                         nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """3x3-3x3 with a projection ``shortcut`` (Sequential conv, BN) where shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + self.shortcut(x)
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


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
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    """Four BasicBlock or Bottleneck stages (planes 64/128/256/512, strides 1/2/2/2), adaptive avg-pool, ``linear``."""

    # RepDistiller's get_feat_modules(): the top-level modules an init stage trains (kdbench.models.feature_modules)
    FEATURE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, block: type[BasicBlock | Bottleneck], num_blocks: list[int], num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        init_kaiming(self)  # zero_init_residual is False in the reference, so nothing else
        install_taps(self, 4)
        # the BN before each stage preact tap's ReLU (its output plus the shortcut is the preact): the last bn3 (bn2)
        last_bn = "bn3" if block is Bottleneck else "bn2"
        self.preact_bn = {f"stage{i}_preact": f"layer{i}.{len(layer) - 1}.{last_bn}"
                          for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), 1)}

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, num_blocks: int,
                    stride: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            layers.append(block(self.in_planes, planes, stride if i == 0 else 1, is_last=(i == num_blocks - 1)))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.tap_stem(F.relu(self.bn1(self.conv1(x))))
        out = self.tap_pre_pool(run_stages(self, out, (self.layer1, self.layer2, self.layer3, self.layer4)))
        out = self.tap_pooled(torch.flatten(self.avgpool(out), 1))
        return self.linear(out)


@register_model(name="ResNet50")
def ResNet50(num_classes: int = 100, in_channels: int = 3) -> ResNet:  # noqa: N802 (RepDistiller's name)
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


@register_model(name="ResNet18")
def ResNet18(num_classes: int = 100, in_channels: int = 3) -> ResNet:  # noqa: N802 (mdistiller's name)
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)
