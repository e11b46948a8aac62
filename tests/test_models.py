"""Model zoo: RepDistiller-compatible module trees, sizes, and tap-based features.

Expected numbers come from models-and-recipe.md tables 1.1 (params, feature shapes) and 1.4 (state_dict sizes). The
ImageNet and Tiny-ImageNet models (tests/test_imagenet_models.py checks them against torchvision and mdistiller) run
the same checks at 64x64 instead of 32x32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.models import create_model, list_models, model_entry
from kdbench.models.taps import FeatureExtractor, Tap, feature_shapes, stage_names

# Table 1.1, millions of parameters at 100 classes.
PARAMS_M = {
    "resnet8": 0.084, "resnet14": 0.181, "resnet20": 0.278, "resnet32": 0.473, "resnet44": 0.667,
    "resnet56": 0.862, "resnet110": 1.737, "resnet8x4": 1.234, "resnet32x4": 7.434,
    "wrn_16_1": 0.181, "wrn_16_2": 0.703, "wrn_40_1": 0.570, "wrn_40_2": 2.255,
    "vgg8": 3.965, "vgg11": 9.277, "vgg13": 9.462,
    # Not in table 1.1; computed from the VGG cfgs "D"/"E" (checked by test_vgg_param_formula).
    "vgg16": 14.774, "vgg19": 20.087,
    "MobileNetV2": 0.813, "ShuffleV1": 0.949, "ShuffleV2": 1.356, "ResNet50": 23.705,
    # Teacher-assistant architectures, table 1.5
    "resnet26": 0.376, "resnet14x4": 2.784, "resnet20x4": 4.334, "resnet26x4": 5.884,
    "wrn_22_2": 1.091, "wrn_28_2": 1.479, "wrn_34_2": 1.867,
    # ImageNet models at 100 classes: torchvision's / mdistiller's 1000-class counts (11.690, 21.798, 25.557, 3.505,
    # 4.232 M) less 900 rows of the head
    "tv_resnet18": 11.228, "tv_resnet34": 21.336, "tv_resnet50": 23.713, "tv_mobilenet_v2": 2.352,
    "mobilenet_v1": 3.309,
    # mdistiller's Tiny-ImageNet models (ResNet18: its CIFAR resnetv2 ResNet18), counted here
    "ResNet18": 11.220, "mobilenetv2_tinyimagenet": 2.369,
}

# Table 1.4: state_dict tensors with (and without) num_batches_tracked.
STATE_DICT_SIZES = {
    "resnet20": (128, 107), "resnet32": (200, 167), "resnet56": (344, 287), "resnet110": (668, 557),
    "resnet8x4": (62, 52), "resnet32x4": (206, 172),
    "wrn_16_2": (83, 70), "wrn_40_1": (226, 189), "wrn_40_2": (227, 190),
    "vgg8": (37, 32), "vgg13": (72, 62),
    "MobileNetV2": (320, 267), "ShuffleV1": (296, 247), "ShuffleV2": (338, 282), "ResNet50": (320, 267),
}

# Keys a RepDistiller checkpoint holds (table 1.4 patterns); heads deliberately differ per family.
KEY_SPOT_CHECKS = {
    "resnet8x4": ["layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer3.0.conv2.weight",
                  "fc.weight", "fc.bias"],
    "resnet56": ["layer2.0.downsample.0.weight", "layer3.8.bn2.num_batches_tracked", "fc.bias"],
    "wrn_16_2": ["block1.layer.0.convShortcut.weight", "block3.layer.1.bn2.running_mean", "bn1.weight", "fc.weight"],
    "wrn_40_1": ["block2.layer.0.convShortcut.weight", "block1.layer.5.conv2.weight"],
    "vgg13": ["block1.3.weight", "block1.3.bias", "block1.4.running_var", "block4.4.weight", "classifier.weight"],
    "vgg8": ["block0.0.bias", "block4.1.running_mean", "classifier.bias"],
    "MobileNetV2": ["conv1.0.weight", "blocks.2.0.conv.7.running_var", "blocks.0.0.conv.0.weight",
                    "conv2.1.weight", "classifier.0.weight", "classifier.0.bias"],
    "ShuffleV1": ["layer1.0.conv1.weight", "layer3.3.bn3.running_mean", "linear.weight"],
    "ShuffleV2": ["layer1.0.conv5.weight", "layer1.0.bn5.running_var", "layer2.7.conv3.weight", "conv2.weight",
                  "bn2.running_mean", "linear.weight"],
    "ResNet50": ["layer1.0.shortcut.0.weight", "layer4.0.shortcut.1.running_var", "layer4.2.conv3.weight",
                 "linear.weight"],
    "ResNet18": ["layer2.0.shortcut.0.weight", "layer4.1.bn2.running_var", "layer1.1.conv2.weight", "linear.bias"],
}
ABSENT_KEYS = {
    "wrn_40_1": ["block1.layer.0.convShortcut.weight"],  # k=1: stage 1 keeps the width
    "resnet56": ["layer1.0.downsample.0.weight"],  # narrow models: stem and stage 1 are both 16 wide
    "ResNet18": ["layer1.0.shortcut.0.weight", "layer4.1.conv3.weight"],  # basic blocks: stage 1 keeps 64 channels
}

HEAD = {"vgg": "classifier", "MobileNetV2": "classifier.0", "ShuffleV1": "linear", "ShuffleV2": "linear",
        "ResNet": "linear", "tv_mobilenet_v2": "classifier.1", "mobilenetv2_tinyimagenet": "conv2"}


def head_name(name: str) -> str:
    for prefix, head in HEAD.items():
        if name.startswith(prefix):
            return head
    return "fc"


def _narrow(stem=16, widths=(16, 32, 64)):
    return {"stem": (stem, 32, 32), "stages": [(widths[0], 32, 32), (widths[1], 16, 16), (widths[2], 8, 8)],
            "pooled": (widths[2],)}


_VGG = {"stem": (64, 32, 32), "stages": [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], "pooled": (512,)}

# Table 1.1 ``feat`` lists: feat[0] = stem, then the stages, last = pooled vector.
FEATURES = {
    **{f"resnet{d}": _narrow() for d in (8, 14, 20, 26, 32, 44, 56, 110)},
    **{f"resnet{d}x4": _narrow(32, (64, 128, 256)) for d in (8, 14, 20, 26, 32)},
    "wrn_16_1": _narrow(), "wrn_40_1": _narrow(),
    **{f"wrn_{d}_2": _narrow(16, (32, 64, 128)) for d in (16, 22, 28, 34, 40)},
    **{n: _VGG for n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": {"stem": (16, 16, 16), "stages": [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
                    "pooled": (1280,)},
    "ShuffleV1": {"stem": (24, 32, 32), "stages": [(240, 16, 16), (480, 8, 8), (960, 4, 4)], "pooled": (960,)},
    "ShuffleV2": {"stem": (24, 32, 32), "stages": [(116, 16, 16), (232, 8, 8), (464, 4, 4)], "pooled": (1024,)},
    "ResNet50": {"stem": (64, 32, 32), "stages": [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
                 "pooled": (2048,)},
    # ImageNet models at 64x64: stem at stride 2, stages at strides 4, 8, 16, 32
    **{f"tv_resnet{d}": {"stem": (64, 32, 32), "stages": [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)],
                         "pooled": (512,)} for d in (18, 34)},
    "tv_resnet50": {"stem": (64, 32, 32), "stages": [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)],
                    "pooled": (2048,)},
    "tv_mobilenet_v2": {"stem": (32, 32, 32), "stages": [(24, 16, 16), (32, 8, 8), (96, 4, 4), (320, 2, 2)],
                        "pooled": (1280,)},
    "mobilenet_v1": {"stem": (32, 32, 32), "stages": [(128, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2)],
                     "pooled": (1024,)},
    "ResNet18": {"stem": (64, 32, 32), "stages": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
                 "pooled": (512,)},
    # at 64x64; the 1x1 stem conv pads by 1: 66x66
    "mobilenetv2_tinyimagenet": {"stem": (32, 66, 66), "stages": [(24, 33, 33), (32, 17, 17), (64, 9, 9),
                                                                   (1280, 9, 9)], "pooled": (1280,)},
}

ALL = list_models()
IMAGENET = [name for name in ALL if model_entry(name).input_size == 224]
# One representative per family, for the costlier checks.
FAMILY = ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50", "ResNet18",
          "tv_resnet18", "tv_mobilenet_v2", "mobilenet_v1", "mobilenetv2_tinyimagenet"]


def _side(name):
    """The test input's side: 32 for the CIFAR zoo, 64 for Tiny-ImageNet and (not 224, to stay cheap) ImageNet."""
    return 32 if model_entry(name).input_size == 32 else 64


def _features(model, x):
    """(logits, features of every tap) in the model's current mode."""
    extractor = FeatureExtractor(model, list(model.feature_taps))
    try:
        return extractor(x)
    finally:
        extractor.remove()


def _input(channels=3, seed=0, side=32):
    return torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(seed))


def test_registry_covers_the_zoo():
    assert set(ALL) == set(PARAMS_M) == set(FEATURES)


def test_unknown_model_lists_valid_names():
    with pytest.raises(KdbenchError) as err:
        create_model("resnet9000")
    message = str(err.value)
    assert "resnet9000" in message
    for name in ("resnet32x4", "wrn_40_2", "vgg13", "MobileNetV2", "ShuffleV2", "ResNet50"):
        assert name in message


@pytest.mark.parametrize("name", ALL)
def test_params_state_dict_and_taps(name):
    model = create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == PARAMS_M[name]

    sd = model.state_dict()
    assert not [k for k in sd if "tap" in k]  # taps carry no state
    if name in STATE_DICT_SIZES:
        without_nbt = [k for k in sd if not k.endswith("num_batches_tracked")]
        assert (len(sd), len(without_nbt)) == STATE_DICT_SIZES[name]
    for key in KEY_SPOT_CHECKS.get(name, []):
        assert key in sd, key
    for key in ABSENT_KEYS.get(name, []):
        assert key not in sd, key
    head = head_name(name)
    assert f"{head}.weight" in sd and sd[f"{head}.weight"].shape[0] == 100
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-5, 0.1, True, True)

    k = len(FEATURES[name]["stages"])
    expected_taps = (["stem"] + [f"stage{i}" for i in range(1, k + 1)]
                     + [f"stage{i}_preact" for i in range(1, k + 1)] + ["pooled", "last_stage_first_block", "pre_pool"])
    assert list(model.feature_taps) == expected_taps
    for path in model.feature_taps.values():
        assert isinstance(model.get_submodule(path), Tap)
    assert stage_names(model) == [f"stage{i}" for i in range(1, k + 1)]

    expected_lr = {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01, "mobilenetv2_tinyimagenet": 0.2}
    assert model_entry(name).base_lr == expected_lr.get(name, 0.1 if name in IMAGENET else 0.05)


def test_vgg_param_formula():
    """vgg16/vgg19 are not in table 1.1; the formula that reproduces vgg8/11/13 gives their counts."""
    cfgs = {
        "vgg8": [[64], [128], [256], [512], [512]],
        "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
        "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
        "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
        "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
    }
    for name, cfg in cfgs.items():
        total, c_in = 512 * 100 + 100, 3
        for width in (w for block in cfg for w in block):
            total += 9 * c_in * width + width + 2 * width  # conv weight + bias, BN affine
            c_in = width
        assert round(total / 1e6, 3) == PARAMS_M[name]
        assert sum(p.numel() for p in create_model(name).parameters()) == total


@pytest.mark.parametrize("name", ALL)
def test_feature_shapes(name):
    model = create_model(name)
    shapes = feature_shapes(model, (3, _side(name), _side(name)))
    expected = FEATURES[name]
    assert shapes["stem"] == expected["stem"]
    assert [shapes[s] for s in stage_names(model)] == expected["stages"]
    assert [shapes[f"{s}_preact"] for s in stage_names(model)] == expected["stages"]
    assert shapes["pooled"] == expected["pooled"]
    assert shapes["logits"] == (100,)


@pytest.mark.parametrize("name", ALL)
def test_grayscale_and_class_count(name):
    model = create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(_input(channels=1, side=_side(name))).shape == (2, 10)
    # Only the first conv's input width changes; key names stay the same.
    assert list(model.state_dict()) == list(create_model(name).state_dict())


@pytest.mark.parametrize("name", FAMILY)
def test_checkpoint_round_trip(name, tmp_path):
    """A state dict in RepDistiller's ckpt_epoch_240.pth layout loads strictly and reproduces the outputs."""
    torch.manual_seed(0)
    source = create_model(name)
    with torch.no_grad():
        source.train()(_input(seed=1, side=_side(name)))  # move BN running stats away from their defaults
    source.eval()
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": source.state_dict(), "accuracy": torch.tensor(1.0), "optimizer": {}}, path)

    torch.manual_seed(1)
    fresh = create_model(name)
    checkpoint = torch.load(path, map_location="cpu")
    result = fresh.load_state_dict(checkpoint["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    x = _input(side=_side(name))
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))


def test_strict_loading_rejects_a_foreign_key():
    """strict=True really is strict: a projection shortcut where RepDistiller has none does not load."""
    sd = create_model("resnet8").state_dict()
    sd["layer1.0.downsample.0.weight"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(RuntimeError):
        create_model("resnet8").load_state_dict(sd, strict=True)


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "ShuffleV1", "ResNet50"])
def test_residual_stage_taps_are_post_relu(name):
    model = create_model(name).eval()
    with torch.no_grad():
        _, feats = _features(model, _input())
    for stage in stage_names(model):
        post, pre = feats[stage], feats[f"{stage}_preact"]
        assert post.min() >= 0
        assert pre.min() < 0
        assert torch.equal(F.relu(pre), post)
    assert feats["stem"].min() >= 0


@pytest.mark.parametrize("name", ["vgg8", "vgg13"])
def test_vgg_stage_taps_are_post_relu_and_preact_is_bn_output(name):
    model = create_model(name).eval()
    with torch.no_grad():
        _, feats = _features(model, _input())
        for i, stage in enumerate(stage_names(model), 1):
            post, pre = feats[stage], feats[f"{stage}_preact"]
            assert post.min() >= 0
            assert not torch.equal(pre, post)
            assert torch.equal(F.relu(pre), post)
        assert feats["stem"].min() >= 0
        # preact of stage 1 is the output of block1's last module (its BN).
        assert torch.allclose(model.block1(model.pool0(feats["stem"])), feats["stage1_preact"])


def test_shufflev2_taps():
    model = create_model("ShuffleV2").eval()
    with torch.no_grad():
        _, feats = _features(model, _input())
    for stage in stage_names(model):
        assert feats[stage].min() >= 0  # shuffled concat of non-negative halves
        assert feats[f"{stage}_preact"].min() < 0  # bn3 output before ReLU, unshuffled
        half = feats[stage].shape[1] // 2
        # Without the shuffle the first half is x1 itself: the post tensor's even channels.
        assert torch.equal(feats[f"{stage}_preact"][:, :half], feats[stage][:, 0::2])


def test_mobilenetv2_preact_taps_get_the_post_tensors(capsys):
    model = create_model("MobileNetV2").eval()
    assert capsys.readouterr().out == ""  # RepDistiller's constructor prints "6 0.5"; ours stays quiet
    with torch.no_grad():
        _, feats = _features(model, _input())
    for stage in stage_names(model):
        assert feats[f"{stage}_preact"] is feats[stage]
        assert feats[stage].min() < 0  # linear bottlenecks


@pytest.mark.parametrize("name", ["wrn_16_2", "wrn_40_1"])
def test_wrn_taps(name):
    model = create_model(name).eval()
    with torch.no_grad():
        _, feats = _features(model, _input())
        for stage in stage_names(model):
            assert feats[stage].min() < 0  # raw residual sums, no ReLU
        next_bns = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
        for stage, bn in zip(stage_names(model), next_bns):
            assert torch.allclose(feats[f"{stage}_preact"], bn(feats[stage]))
        assert torch.equal(feats["stem"], model.conv1(_input()))


def test_wrn_preact_leaves_running_stats_alone(monkeypatch):
    torch.manual_seed(0)
    with_taps = create_model("wrn_16_2").train()
    plain = create_model("wrn_16_2").train()
    plain.load_state_dict(with_taps.state_dict())
    x = _input()
    logits_taps, feats = _features(with_taps, x)
    assert set(feats) >= {"stage1_preact", "stage2_preact", "stage3_preact"}
    logits_plain = plain(x)
    assert torch.equal(logits_taps, logits_plain)
    for (key, a), b in zip(with_taps.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), key  # running_mean/var and num_batches_tracked updated exactly once

    # The extra BN pass only runs when a preact tap is listened to.
    import kdbench.models.wrn as wrn

    calls = []
    monkeypatch.setattr(wrn, "_bn_without_update", lambda bn, x: calls.append(bn) or bn(x))
    plain(x)
    assert calls == []


# At init, in eval mode with default BN statistics, these two barely let the features reach the logits (about 1e-10
# for tv_mobilenet_v2, the fc bias for mobilenet_v1): test_imagenet_models checks their taps on the pooled features.
@pytest.mark.parametrize("name", [n for n in FAMILY if n not in ("tv_mobilenet_v2", "mobilenet_v1")])
def test_taps_feed_the_forward(name):
    """A hook that replaces a tap's output changes what the rest of the network computes."""
    model = create_model(name).eval()
    x = _input(side=_side(name))
    with torch.no_grad():
        reference = model(x)
        handle = model.get_submodule(model.feature_taps["stage2"]).register_forward_hook(
            lambda _m, _i, out: torch.zeros_like(out))
        changed = model(x)
        handle.remove()
        assert not torch.allclose(changed, reference)

        handle = model.get_submodule(model.feature_taps["pooled"]).register_forward_hook(
            lambda _m, _i, out: torch.zeros_like(out))
        head_only = model(x)
        handle.remove()
        bias = model.get_submodule(head_name(name)).bias
        assert torch.allclose(head_only, bias.expand_as(head_only))

        assert torch.equal(model(x), reference)  # hooks removed: back to normal


# ---------------------------------------------------------------------------------- in-network taps (letKD)

# methods.md §7.5: (C, H, W) of `last_stage_first_block` and `pre_pool` where the letKD configs list them;
# elsewhere both equal the last stage's shape (VGG: the first conv unit of block4 keeps its shape).
INNER_TAPS = {
    "resnet20": ((64, 8, 8), (64, 8, 8)), "resnet56": ((64, 8, 8), (64, 8, 8)),
    "resnet8x4": ((256, 8, 8), (256, 8, 8)), "resnet32x4": ((256, 8, 8), (256, 8, 8)),
    "wrn_16_2": ((128, 8, 8), (128, 8, 8)), "wrn_40_1": ((64, 8, 8), (64, 8, 8)),
    "wrn_40_2": ((128, 8, 8), (128, 8, 8)),
    "ShuffleV1": ((960, 4, 4), (960, 4, 4)), "ShuffleV2": ((464, 4, 4), (1024, 4, 4)),
    "MobileNetV2": ((80, 2, 2), (1280, 2, 2)), "ResNet50": ((2048, 4, 4), (2048, 4, 4)),
    "tv_mobilenet_v2": ((160, 2, 2), (1280, 2, 2)), "mobilenetv2_tinyimagenet": ((96, 9, 9), (1280, 9, 9)),  # 64x64
}


@pytest.mark.parametrize("name", ALL)
def test_inner_tap_shapes(name):
    shapes = feature_shapes(create_model(name), (3, _side(name), _side(name)))
    last = FEATURES[name]["stages"][-1]
    expected = INNER_TAPS.get(name, (last, last))
    assert (shapes["last_stage_first_block"], shapes["pre_pool"]) == expected


def test_inner_taps_see_the_documented_tensors():
    x = _input()
    with torch.no_grad():
        model = create_model("resnet20").eval()
        _, f = _features(model, x)
        assert torch.equal(f["last_stage_first_block"], model.layer3[0](f["stage2"]))
        assert torch.equal(f["pre_pool"], f["stage3"])
        model = create_model("wrn_16_2").eval()
        _, f = _features(model, x)
        assert torch.equal(f["last_stage_first_block"], model.block3.layer[0](f["stage2"]))
        assert torch.equal(f["pre_pool"], F.relu(model.bn1(f["stage3"])))
        model = create_model("MobileNetV2").eval()
        _, f = _features(model, x)
        assert torch.equal(f["last_stage_first_block"], model.blocks[5][0](f["stage3"]))  # stage3 = blocks[4]
        assert torch.equal(f["pre_pool"], model.conv2(f["stage4"]))
        model = create_model("ShuffleV2").eval()
        _, f = _features(model, x)
        assert torch.equal(f["last_stage_first_block"], model.layer3[0](f["stage2"]))
        model = create_model("vgg13").eval()
        _, f = _features(model, x)
        assert torch.equal(f["last_stage_first_block"], model.block4[:3](f["stage3"]))
        assert torch.equal(f["pre_pool"], f["stage4"])


@pytest.mark.parametrize("name", [*FAMILY, "resnet20", "vgg13"])
@pytest.mark.parametrize("tap", ["last_stage_first_block", "pre_pool"])
def test_inner_taps_feed_the_forward(name, tap):
    """A replacing hook on either in-network tap changes the logits (one-block stages included: resnet8x4, vgg8)."""
    model = create_model(name).eval()
    x = _input(side=_side(name))
    with torch.no_grad():
        reference = model(x)
        handle = model.get_submodule(model.feature_taps[tap]).register_forward_hook(
            lambda _m, _i, out: out + 1.0)
        changed = model(x)
        handle.remove()
        assert not torch.allclose(changed, reference)
        assert torch.equal(model(x), reference)


def test_coinciding_taps_compose():
    """ResNet's pre_pool sees stage3's tensor, but it is its own tap: its hook runs after (and on) stage3's."""
    model = create_model("resnet8x4").eval()  # one-block layer3: last_stage_first_block, stage3, pre_pool coincide
    seen = []
    handles = [model.get_submodule(model.feature_taps[name]).register_forward_hook(
        lambda _m, _i, out, name=name: (seen.append((name, float(out.mean()))), out + 1.0)[1])
        for name in ("pre_pool", "stage3", "last_stage_first_block")]
    with torch.no_grad():
        model(_input())
    for handle in handles:
        handle.remove()
    assert [name for name, _ in seen] == ["last_stage_first_block", "stage3", "pre_pool"]
    means = [mean for _, mean in seen]
    assert means[1] == pytest.approx(means[0] + 1.0, abs=1e-5)
    assert means[2] == pytest.approx(means[0] + 2.0, abs=1e-5)
