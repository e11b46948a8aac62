"""CIFAR VGGs with BN (RepDistiller ``vgg*_bn``, registered under the short names ``vgg8`` .. ``vgg19``)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models.common import init_msra_normal, install_taps

# Conv widths of block0..block4 (RepDistiller ``cfg``).
_CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """[conv3x3 (bias), BN, ReLU] x m without the final ReLU: conv at index 3m, BN at 3m+1.

    The last ReLU is applied in forward so the BN output (the preact feature) stays readable.
    """
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five blocks; max-pool after blocks 0-2 (pool3 only for 64x64 inputs), global avg-pool, ``classifier``."""

    # RepDistiller's get_feat_modules(): the top-level modules an init stage trains (kdbench.models.feature_modules)
    FEATURE_MODULES = ("block0", "pool0", "block1", "pool1", "block2", "pool2", "block3", "pool3", "block4", "pool4")

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.block0 = _make_block(cfg[0], in_channels)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        init_msra_normal(self, linear_std=0.01)
        install_taps(self, 4)
        # the BN before each stage preact tap's ReLU: the last module of block1..4
        self.preact_bn = {f"stage{i}_preact": f"block{i}.{len(block) - 1}"
                          for i, block in enumerate((self.block1, self.block2, self.block3, self.block4), 1)}

    def forward(self, x):
        # On 32x32 inputs pool3 is skipped, so blocks 3 and 4 both run at 4x4 (as in RepDistiller).
        pools = (self.pool1, self.pool2, self.pool3 if x.shape[2] == 64 else None)
        x = self.tap_stem(F.relu(self.block0(x)))
        x = self.pool0(x)
        for i, (block, pool) in enumerate(zip((self.block1, self.block2, self.block3), pools), 1):
            preact = block(x)
            getattr(self, f"tap_stage{i}_preact")(preact)
            x = getattr(self, f"tap_stage{i}")(F.relu(preact))  # not in place: preact must survive
            if pool is not None:
                x = pool(x)
        # The last stage, block4. Its "first block" is its first conv-BN-ReLU unit, the VGG analogue of a
        # residual block: with more than one unit (vgg11..19) that unit's output feeds the rest of block4 through
        # tap_last_stage_first_block; with one unit (vgg8) the tap sees the post-ReLU block4 output (= stage4),
        # like resnet8x4's one-block layer3.
        if len(self.block4) > 2:
            x = self.tap_last_stage_first_block(self.block4[2](self.block4[1](self.block4[0](x))))
            for j in range(3, len(self.block4)):
                x = self.block4[j](x)
            preact = x
        else:
            preact = self.block4(x)
        self.tap_stage4_preact(preact)
        x = F.relu(preact)  # not in place: preact must survive
        if len(self.block4) <= 2:
            x = self.tap_last_stage_first_block(x)
        x = self.tap_pre_pool(self.tap_stage4(x))
        x = self.tap_pooled(torch.flatten(self.pool4(x), 1))
        return self.classifier(x)


# RepDistiller's vgg8_bn .. vgg19_bn (their cfg keys S, A, B, D, E).
for _name, _cfg in (("vgg8", "S"), ("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E")):
    register_model(partial(VGG, _CFG[_cfg]), name=_name, family="vgg")
