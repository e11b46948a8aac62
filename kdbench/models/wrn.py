"""Wide ResNets (depth 6n+4) with RepDistiller's module tree (``models/wrn.py``), dropout 0."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import init_msra_normal, install_taps, run_first_block_tapped
from kdbench.models.taps import Tap


class BasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv-BN-ReLU-conv; a 1x1 ``convShortcut`` only when widths differ."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None
        if not self.equalInOut:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # With differing widths the shortcut sees the activated input, as in the reference.
        shortcut = x if self.equalInOut else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage: attribute ``layer`` holds the blocks (the name is part of the checkpoint keys)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(nb_layers)
        ])

    def forward(self, x):
        return self.layer(x)


def _bn_without_update(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` for a preact tap without touching running statistics.

    The reference calls the BN module a second time, which in train mode updates its running stats twice
    per step. momentum=0.0 keeps running_mean/var as they are (and num_batches_tracked is not passed), while
    training=bn.training still normalises with batch statistics in train mode, like the module would.
    """
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training=bn.training, momentum=0.0, eps=bn.eps)


class WideResNet(nn.Module):
    """RepDistiller's WRN: bare ``conv1`` stem, ``block1..3``, head ``bn1``-ReLU-avgpool(8)-``fc``.

    Stage taps see raw residual sums (no ReLU); preact taps see the next BN applied without ReLU.
    """

    # RepDistiller's get_feat_modules(): the top-level modules an init stage trains (kdbench.models.feature_modules)
    FEATURE_MODULES = ("conv1", "block1", "block2", "block3")  # not the final bn1

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        assert (depth - 4) % 6 == 0, "depth must be 6n+4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.nChannels = widths[3]
        init_msra_normal(self, linear_std=None)
        install_taps(self, 3)
        # the BN before each stage preact tap's ReLU: the next BN, which the preact taps apply (see forward)
        self.preact_bn = {"stage1_preact": "block2.layer.0.bn1", "stage2_preact": "block3.layer.0.bn1",
                          "stage3_preact": "bn1"}

    def forward(self, x):
        out = self.tap_stem(self.conv1(x))
        next_bns = (self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1)
        for i, (stage, next_bn) in enumerate(zip((self.block1, self.block2, self.block3), next_bns), 1):
            if i < 3:
                out = stage(out)
            else:  # block3.layer[0]'s output feeds the rest of block3 through its tap
                out = run_first_block_tapped(stage.layer, out, self.tap_last_stage_first_block)
            out = getattr(self, f"tap_stage{i}")(out)
            preact_tap: Tap = getattr(self, f"tap_stage{i}_preact")
            if preact_tap.active:  # an extra BN pass, only paid for when someone listens
                preact_tap(_bn_without_update(next_bn, out))
        out = self.tap_pre_pool(self.relu(self.bn1(out)))
        out = self.tap_pooled(torch.flatten(F.avg_pool2d(out, 8), 1))
        return self.fc(out)


# RepDistiller's WRNs, plus the depths of the wrn_40_2 -> wrn_16_2 teacher-assistant chain (methods/assistants.py),
# built with the WideResNet(depth, widen_factor) constructor of HobbitLong/RepDistiller models/wrn.py.
for _depth, _width in ((16, 1), (16, 2), (22, 2), (28, 2), (34, 2), (40, 1), (40, 2)):
    register_model(partial(WideResNet, _depth, _width), name=f"wrn_{_depth}_{_width}", family="wrn")
