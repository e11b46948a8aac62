"""ShuffleNetV1 for CIFAR (RepDistiller ``ShuffleV1``: groups 3, widths 240/480/960, blocks 4/8/4).

RepDistiller applies no custom init here, so PyTorch's default layer init is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import install_taps, run_stages


class ShuffleBlock(nn.Module):
    """Channel shuffle [N,C,H,W] -> [N,g,C/g,H,W] -> swap -> [N,C,H,W]; parameter-free (shared with V2)."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an avg-pooled input, else adds."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups  # the 24-channel stem output is not grouped
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ShuffleNet(nn.Module):
    """1x1 stem (no down-sampling), three stages each opening with a stride-2 block, avg-pool(4), ``linear``."""

    # RepDistiller's get_feat_modules(): the top-level modules an init stage trains (kdbench.models.feature_modules)
    FEATURE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3")

    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        install_taps(self, 3)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The stride-2 block's branch makes out - in channels; the pooled input fills the rest.
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride=2 if i == 0 else 1,
                                     groups=groups, is_last=(i == num_blocks - 1)))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.tap_stem(F.relu(self.bn1(self.conv1(x))))
        out = self.tap_pre_pool(run_stages(self, out, (self.layer1, self.layer2, self.layer3)))
        out = self.tap_pooled(torch.flatten(F.avg_pool2d(out, 4), 1))
        return self.linear(out)


@register_model(name="ShuffleV1", base_lr=0.01)
def ShuffleV1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNet:  # noqa: N802 (RepDistiller's name)
    return ShuffleNet([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes, in_channels=in_channels)
