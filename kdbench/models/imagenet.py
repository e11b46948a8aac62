"""ImageNet models: torchvision's ResNet-18/34/50 and MobileNetV2, and the MobileNetV1 of CRD and mdistiller.

The torchvision models subclass torchvision's own classes and add only parameter-free taps and a forward that calls
them, so module tree, state_dict keys and outputs are torchvision's and its published weights (``resnet34-b627a593.pth``
...) load with ``strict=True``. MobileNetV1 rebuilds megvii-research/mdistiller's ``models/imagenet/mobilenetv1.py``
(commit a08d46f) with the same module tree, so mdistiller's checkpoints load strictly.

Registered as ``tv_resnet18``, ``tv_resnet34``, ``tv_resnet50``, ``tv_mobilenet_v2`` and ``mobilenet_v1`` (input size
224, base_lr 0.1: the ImageNet recipe's learning rate at batch 256). The stem downsamples by 2 and stage K by 2^(K+1),
so at 224x224 the four stages are 56, 28, 14 and 7 pixels wide; every model runs at 32x32 and up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import resnet as tv_resnet

from kdbench.models import register_model
from kdbench.models.common import install_taps, run_stages

IMAGENET_SIZE = 224
IMAGENET_LR = 0.1  # SGD lr at batch 256 (torchvision's reference recipe, mdistiller's ImageNet configs: 0.2 at 512)


def _replace_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """``conv`` with ``in_channels`` inputs (grayscale data), initialised as torchvision initialises convs; ``conv``
    itself where the width already fits, so RGB models keep torchvision's random stream."""
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


# ------------------------------------------------------------------------------------------------------ ResNet


class _PreactMixin:
    """A residual block that can hand out its pre-ReLU sum: with ``is_last`` (set on each stage's last block) it
    returns ``(relu(preact), preact)``, as ``kdbench.models.common.run_stages`` expects."""

    is_last = False

    def forward(self, x):
        preact = self.residual_sum(x)
        if self.is_last:
            return F.relu(preact), preact  # not in place: the preact tap keeps the sum
        return self.relu(preact)


class BasicBlock(_PreactMixin, tv_resnet.BasicBlock):
    """torchvision 0.29's ``BasicBlock`` (its ``__init__``, so its module names); the forward computes the same ops."""

    def residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return out + (x if self.downsample is None else self.downsample(x))


class Bottleneck(_PreactMixin, tv_resnet.Bottleneck):
    """torchvision 0.29's ``Bottleneck`` (ResNet V1.5: stride on the 3x3 conv); the forward computes the same ops."""

    def residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))


class ResNet(tv_resnet.ResNet):
    """torchvision 0.29's ``torchvision.models.ResNet`` (7x7 stride-2 stem, 3x3 max-pool, ``layer1..4``, ``fc``) with
    kdbench's taps.

    Taps: ``stem`` after conv1-bn1-relu (before the max-pool, 64 x H/2: mdistiller's ImageNet ResNet's first feature),
    ``stageK`` after ``layerK`` (post-ReLU) and ``stageK_preact`` the sum of ``layerK``'s last block before its ReLU
    (mdistiller's ``preact_feats``; ``preact_bn`` names that block's last BN), ``last_stage_first_block`` after
    ``layer4[0]``, ``pre_pool`` = stage4, ``pooled`` the flattened average pool.
    """

    # the top-level modules an init stage trains (kdbench.models.feature_modules): all but the pool and ``fc``
    FEATURE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 in_channels: int = 3):
        super().__init__(block, layers, num_classes=num_classes)
        self.conv1 = _replace_first_conv(self.conv1, in_channels)
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        for layer in stages:
            layer[-1].is_last = True
        install_taps(self, 4)
        last_bn = "bn3" if block is Bottleneck else "bn2"
        self.preact_bn = {f"stage{i}_preact": f"layer{i}.{len(layer) - 1}.{last_bn}"
                          for i, layer in enumerate(stages, 1)}

    def forward(self, x):
        x = self.tap_stem(self.relu(self.bn1(self.conv1(x))))
        x = run_stages(self, self.maxpool(x), (self.layer1, self.layer2, self.layer3, self.layer4))
        x = self.tap_pre_pool(x)
        x = self.tap_pooled(torch.flatten(self.avgpool(x), 1))
        return self.fc(x)


@register_model(name="tv_resnet18", base_lr=IMAGENET_LR, family="tv_resnet", input_size=IMAGENET_SIZE)
def tv_resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """``torchvision.models.resnet18``: BasicBlock stages of 2, 2, 2, 2."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@register_model(name="tv_resnet34", base_lr=IMAGENET_LR, family="tv_resnet", input_size=IMAGENET_SIZE)
def tv_resnet34(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """``torchvision.models.resnet34``: BasicBlock stages of 3, 4, 6, 3."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


@register_model(name="tv_resnet50", base_lr=IMAGENET_LR, family="tv_resnet", input_size=IMAGENET_SIZE)
def tv_resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """``torchvision.models.resnet50``: Bottleneck stages of 3, 4, 6, 3."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


# ------------------------------------------------------------------------------------------------- MobileNetV2

# Index in ``features`` of the last block of each stage. torchvision's ``features`` are the stem (0), the 17
# InvertedResiduals of the (t, c, n, s) table (1: 16 ch; 2-3: 24; 4-6: 32; 7-10: 64; 11-13: 96; 14-16: 160;
# 17: 320) and the 1x1 conv to 1280 (18). The stages end where RepDistiller's/CRD's and mdistiller's MobileNetV2 take
# features (after its ``blocks`` groups 1, 2, 4 and 6): the 24-, 32-, 96- and 320-channel groups, at strides 4-32.
_MV2_STAGE_ENDS = (3, 6, 13, 17)
_MV2_LAST_STAGE_FIRST = 14  # the first block of the last stage (the first 160-channel block), as the CIFAR model's


class MobileNetV2(tv_mobilenetv2.MobileNetV2):
    """torchvision 0.29's ``torchvision.models.MobileNetV2`` (width 1.0, ReLU6, ``features``, ``classifier`` =
    Dropout(0.2) + Linear) with kdbench's taps.

    Taps: ``stem`` after ``features[0]`` (32 x H/2), ``stageK`` after ``features[3]``, ``[6]``, ``[13]``, ``[17]``
    (24, 32, 96, 320 channels); linear bottlenecks, so ``stageK_preact`` gets the same tensor, and ``preact_bn`` names
    the last block's pw-linear BN. ``last_stage_first_block`` after ``features[14]``, ``pre_pool`` after the 1x1 conv
    to 1280 (``features[18]``), ``pooled`` the flattened average pool.
    """

    # the modules an init stage trains (kdbench.models.feature_modules): the stem and the blocks, not the 1x1 conv to
    # 1280 (as RepDistiller's MobileNetV2 leaves out ``conv2``)
    FEATURE_MODULES = tuple(f"features.{i}" for i in range(_MV2_STAGE_ENDS[-1] + 1))

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__(num_classes=num_classes)
        stem = self.features[0]
        stem[0] = _replace_first_conv(stem[0], in_channels)
        install_taps(self, len(_MV2_STAGE_ENDS))
        self.preact_bn = {f"stage{i}_preact": f"features.{b}.conv.{len(self.features[b].conv) - 1}"
                          for i, b in enumerate(_MV2_STAGE_ENDS, 1)}

    def forward(self, x):
        x = self.tap_stem(self.features[0](x))
        stage = 0
        for i in range(1, len(self.features) - 1):
            x = self.features[i](x)
            if i == _MV2_LAST_STAGE_FIRST:
                x = self.tap_last_stage_first_block(x)
            if i in _MV2_STAGE_ENDS:
                stage += 1
                getattr(self, f"tap_stage{stage}_preact")(x)
                x = getattr(self, f"tap_stage{stage}")(x)
        x = self.tap_pre_pool(self.features[-1](x))
        x = self.tap_pooled(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))
        return self.classifier(x)


@register_model(name="tv_mobilenet_v2", base_lr=IMAGENET_LR, family="tv_mobilenetv2", input_size=IMAGENET_SIZE)
def tv_mobilenet_v2(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV2:
    """``torchvision.models.mobilenet_v2``."""
    return MobileNetV2(num_classes, in_channels)


# ------------------------------------------------------------------------------------------------- MobileNetV1

# Entries of ``model`` that end a stage: the last block at each resolution from stride 4 on (128, 256, 512 and 1024
# channels), mdistiller's four ``feats`` and the BNs of its ``get_bn_before_relu``.
_MV1_STAGE_ENDS = (3, 5, 11, 13)


def _conv_bn_relu(inp: int, oup: int, stride: int) -> nn.Sequential:
    """The full 3x3 stem conv: conv (bias-free), BN, ReLU at indices 0-2."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _depthwise_separable(inp: int, oup: int, stride: int) -> nn.Sequential:
    """dw 3x3 conv, BN, ReLU, pw 1x1 conv, BN, ReLU at indices 0-5 (convs bias-free)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True),
    )


class WholeMapAvgPool(nn.Module):
    """Average pooling with the kernel as large as the map: at 224x224 input (7x7 maps) exactly mdistiller's
    ``AvgPool2d(7)``, same kernel and same arithmetic, and a global average at any other size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, tuple(x.shape[-2:]))


class MobileNetV1(nn.Module):
    """MobileNetV1 as CRD's and mdistiller's ImageNet experiments define it (mdistiller
    ``mdistiller/models/imagenet/mobilenetv1.py``, commit a08d46f): ``model`` = a stride-2 3x3 stem conv, 13
    depthwise-separable blocks (64 .. 1024 channels, total stride 32) and the pool at index 14, then ``fc``.

    Differences, none of which touch the state_dict: ``model[14]`` pools the whole map (mdistiller's ``AvgPool2d(7)``
    computes the same at 224x224 and fails below it), ``num_classes`` and ``in_channels`` are
    arguments (mdistiller: 1000 and 3), and the stage ends apply their last ReLU out of place so the preact survives.
    Weights keep PyTorch's default init, as mdistiller's (which sets none).

    Taps: ``stem`` after ``model[0]`` (32 x H/2); ``stageK`` after ``model[3]``, ``[5]``, ``[11]``, ``[13]`` (128,
    256, 512, 1024 channels at strides 4, 8, 16, 32); ``stageK_preact`` their last BN's output (``preact_bn``);
    ``last_stage_first_block`` after ``model[12]``; ``pre_pool`` = stage4; ``pooled`` the flattened pool.
    """

    # the modules an init stage trains (kdbench.models.feature_modules): every conv block, not the pool or ``fc``
    FEATURE_MODULES = tuple(f"model.{i}" for i in range(_MV1_STAGE_ENDS[-1] + 1))

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        # (output channels, stride) of the 13 depthwise-separable blocks
        blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
        layers, width = [_conv_bn_relu(in_channels, 32, 2)], 32
        for out, stride in blocks:
            layers.append(_depthwise_separable(width, out, stride))
            width = out
        layers.append(WholeMapAvgPool())
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)
        install_taps(self, len(_MV1_STAGE_ENDS))
        self.preact_bn = {f"stage{i}_preact": f"model.{b}.4" for i, b in enumerate(_MV1_STAGE_ENDS, 1)}

    def forward(self, x):
        x = self.tap_stem(self.model[0](x))
        stage = 0
        for i in range(1, _MV1_STAGE_ENDS[-1] + 1):
            block = self.model[i]
            if i not in _MV1_STAGE_ENDS:
                x = block(x)
            else:
                stage += 1
                preact = block[:-1](x)  # dw conv .. pw BN, without the block's final ReLU
                getattr(self, f"tap_stage{stage}_preact")(preact)
                x = getattr(self, f"tap_stage{stage}")(F.relu(preact))
            if i == _MV1_STAGE_ENDS[-2] + 1:
                x = self.tap_last_stage_first_block(x)
        x = self.tap_pre_pool(x)
        x = self.tap_pooled(torch.flatten(self.model[14](x), 1))
        return self.fc(x)


@register_model(name="mobilenet_v1", base_lr=IMAGENET_LR, family="mobilenetv1", input_size=IMAGENET_SIZE)
def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels)
