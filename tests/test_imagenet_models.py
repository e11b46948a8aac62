"""ImageNet models: torchvision's ResNets and MobileNetV2 with taps, and mdistiller's MobileNetV1; mdistiller's
Tiny-ImageNet models (ResNet18, the Tiny-ImageNet MobileNetV2).

The torchvision models are compared with torchvision itself (keys, strict loading, bit-identical outputs, the tensors
at every stage boundary); the mdistiller models' expected key sets and shapes are written out here from mdistiller's
``mdistiller/models/imagenet/mobilenetv1.py``, ``models/cifar/resnetv2.py`` and ``models/cifar/mv2_tinyimagenet.py``
(commit a08d46f). Inputs are 2x3x64x64 to stay cheap on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_models import _features
from torch import nn

from kdbench.models import create_model, feature_modules, list_models, model_entry
from kdbench.models.imagenet import WholeMapAvgPool
from kdbench.models.taps import feature_shapes, stage_names

TORCHVISION = {"tv_resnet18": "resnet18", "tv_resnet34": "resnet34", "tv_resnet50": "resnet50",
               "tv_mobilenet_v2": "mobilenet_v2"}
IMAGENET = [*TORCHVISION, "mobilenet_v1"]
FAMILIES = {"tv_resnet18": "tv_resnet", "tv_resnet34": "tv_resnet", "tv_resnet50": "tv_resnet",
            "tv_mobilenet_v2": "tv_mobilenetv2", "mobilenet_v1": "mobilenetv1"}

# (channels, side) of stem, stage1..4 at 64x64
SHAPES_64 = {
    "tv_resnet18": [(64, 32), (64, 16), (128, 8), (256, 4), (512, 2)],
    "tv_resnet34": [(64, 32), (64, 16), (128, 8), (256, 4), (512, 2)],
    "tv_resnet50": [(64, 32), (256, 16), (512, 8), (1024, 4), (2048, 2)],
    "tv_mobilenet_v2": [(32, 32), (24, 16), (32, 8), (96, 4), (320, 2)],
    "mobilenet_v1": [(32, 32), (128, 16), (256, 8), (512, 4), (1024, 2)],
}

# Where torchvision computes each tap: (module path, "output" of that module or "input" to it).
_RESNET_POINTS = {"stem": ("maxpool", "input"), "stage1": ("layer1", "output"), "stage2": ("layer2", "output"),
                  "stage3": ("layer3", "output"), "stage4": ("layer4", "output"),
                  "last_stage_first_block": ("layer4.0", "output"), "pre_pool": ("avgpool", "input"),
                  "pooled": ("fc", "input")}
TORCHVISION_POINTS = {
    **{name: _RESNET_POINTS for name in ("tv_resnet18", "tv_resnet34", "tv_resnet50")},
    "tv_mobilenet_v2": {"stem": ("features.0", "output"), "stage1": ("features.3", "output"),
                        "stage2": ("features.6", "output"), "stage3": ("features.13", "output"),
                        "stage4": ("features.17", "output"), "last_stage_first_block": ("features.14", "output"),
                        "pre_pool": ("features.18", "output"), "pooled": ("classifier", "input")},
}


def _input(seed=0, channels=3):
    return torch.randn(2, channels, 64, 64, generator=torch.Generator().manual_seed(seed))


def _torchvision_pair(name):
    """(torchvision's model with BN statistics moved by one train step, ours with its weights), both in eval mode."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, TORCHVISION[name])(weights=None)
    with torch.no_grad():
        reference.train()(_input(seed=1))
    ours = create_model(name, num_classes=1000)
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return reference.eval(), ours.eval()


def _recorded(model, points, x):
    """(logits, {tap: tensor}) read with forward hooks at ``points`` of an untapped model."""
    seen, handles = {}, []
    for tap, (path, where) in points.items():
        module = model.get_submodule(path)
        if where == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, tap=tap: seen.__setitem__(tap, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, tap=tap: seen.__setitem__(tap, out)))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_keys_weights_outputs_and_stage_tensors(name):
    reference, ours = _torchvision_pair(name)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()]
    # the same module tree: every torchvision module path exists in ours with the same type (or a subclass of it)
    ours_modules = dict(ours.named_modules())
    for path, module in reference.named_modules():
        assert isinstance(ours_modules[path], type(module)), path

    x = _input()
    with torch.no_grad():
        expected_logits, expected = _recorded(reference, TORCHVISION_POINTS[name], x)
        logits, feats = _features(ours, x)
        assert torch.equal(ours(x), expected_logits)
    assert torch.equal(logits, expected_logits)
    for tap, tensor in expected.items():
        assert torch.equal(feats[tap], tensor), tap


@pytest.mark.parametrize("name", IMAGENET)
def test_feature_shapes_at_64(name):
    model = create_model(name, num_classes=1000)
    shapes = feature_shapes(model, (3, 64, 64))
    (c0, s0), *stages = SHAPES_64[name]
    assert shapes["stem"] == (c0, s0, s0)
    assert stage_names(model) == ["stage1", "stage2", "stage3", "stage4"]
    assert [shapes[f"stage{i}"] for i in range(1, 5)] == [(c, s, s) for c, s in stages]
    assert [shapes[f"stage{i}_preact"] for i in range(1, 5)] == [(c, s, s) for c, s in stages]
    assert shapes["pooled"] == (model.fc.in_features if hasattr(model, "fc") else 1280,)
    assert shapes["logits"] == (1000,)


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_resnet50", "mobilenet_v1"])
def test_preact_taps_are_the_sums_before_the_last_relu(name):
    model = create_model(name, num_classes=1000).eval()
    bns = {tap: model.get_submodule(path) for tap, path in model.preact_bn.items()}
    bn_out = {}
    handles = [bn.register_forward_hook(lambda _m, _i, out, tap=tap: bn_out.__setitem__(tap, out))
               for tap, bn in bns.items()]
    with torch.no_grad():
        _, feats = _features(model, _input())
    for handle in handles:
        handle.remove()
    for stage in stage_names(model):
        pre, post = feats[f"{stage}_preact"], feats[stage]
        assert pre.min() < 0 and post.min() >= 0
        assert torch.equal(F.relu(pre), post)
        assert type(bns[f"{stage}_preact"]) is nn.BatchNorm2d
        if name == "mobilenet_v1":  # no shortcut: the preact is the BN's output itself
            assert torch.equal(pre, bn_out[f"{stage}_preact"])
    assert feats["stem"].min() >= 0


def test_mobilenet_v2_preact_taps_get_the_linear_bottlenecks():
    model = create_model("tv_mobilenet_v2", num_classes=1000).eval()
    with torch.no_grad():
        _, feats = _features(model, _input())
    for stage in stage_names(model):
        assert feats[f"{stage}_preact"] is feats[stage]
        assert feats[stage].min() < 0
    assert model.preact_bn == {"stage1_preact": "features.3.conv.3", "stage2_preact": "features.6.conv.3",
                               "stage3_preact": "features.13.conv.3", "stage4_preact": "features.17.conv.3"}
    assert feats["stem"].min() >= 0 and feats["stem"].max() <= 6  # ReLU6


@pytest.mark.parametrize("name", ["tv_mobilenet_v2", "mobilenet_v1"])
def test_mobilenet_taps_feed_the_forward(name):
    """A hook that zeroes stage2 changes the pooled features (relatively: untrained, they are tiny) and one that
    zeroes the pooled features leaves the head's bias."""
    model = create_model(name, num_classes=1000).eval()
    x, stage2 = _input(), model.get_submodule(model.feature_taps["stage2"])
    with torch.no_grad():
        _, reference = _features(model, x)
        handle = stage2.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
        _, changed = _features(model, x)
        handle.remove()
        assert not torch.allclose(changed["pooled"], reference["pooled"], rtol=1e-3, atol=0)
        assert torch.equal(changed["stage2"], torch.zeros_like(reference["stage2"]))
        handle = model.get_submodule(model.feature_taps["pooled"]).register_forward_hook(
            lambda _m, _i, out: torch.zeros_like(out))
        head_only = model(x)
        handle.remove()
        head = model.fc if name == "mobilenet_v1" else model.classifier[1]
        assert torch.equal(head_only, head.bias.expand_as(head_only))
        _, again = _features(model, x)
        assert torch.equal(again["pooled"], reference["pooled"])


def test_resnet_preact_bn_is_the_last_blocks_last_bn():
    assert create_model("tv_resnet18").preact_bn == {f"stage{i}_preact": f"layer{i}.1.bn2" for i in range(1, 5)}
    assert create_model("tv_resnet50").preact_bn == {
        "stage1_preact": "layer1.2.bn3", "stage2_preact": "layer2.3.bn3", "stage3_preact": "layer3.5.bn3",
        "stage4_preact": "layer4.2.bn3"}


# --------------------------------------------------------------------------------------------------- MobileNetV1

# mdistiller's ``self.model``: conv_bn(3, 32, 2), then conv_dw(inp, oup, stride) for these (inp, oup, stride)
MV1_BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
              (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
              (1024, 1024, 1)]
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _mdistiller_mobilenet_v1_shapes(num_classes=1000):
    """{state_dict key: shape} of mdistiller's MobileNetV1, from its constructor: conv_bn = Sequential(conv, BN,
    ReLU), conv_dw = Sequential(dw conv, BN, ReLU, pw conv, BN, ReLU), all convs bias-free, then ``fc``."""
    shapes = {"model.0.0.weight": (32, 3, 3, 3)}
    shapes.update({f"model.0.1.{k}": (32,) for k in _BN})
    for i, (inp, oup, _) in enumerate(MV1_BLOCKS, 1):
        shapes[f"model.{i}.0.weight"] = (inp, 1, 3, 3)
        shapes.update({f"model.{i}.1.{k}": (inp,) for k in _BN})
        shapes[f"model.{i}.3.weight"] = (oup, inp, 1, 1)
        shapes.update({f"model.{i}.4.{k}": (oup,) for k in _BN})
    shapes.update({"fc.weight": (num_classes, 1024), "fc.bias": (num_classes,)})
    return {k: () if k.endswith("num_batches_tracked") else v for k, v in shapes.items()}


def test_mobilenet_v1_has_mdistillers_state_dict():
    model = create_model("mobilenet_v1", num_classes=1000)
    expected = _mdistiller_mobilenet_v1_shapes()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert len(expected) == 164 and sum(p.numel() for p in model.parameters()) == 4_231_976
    for i, (_, _, stride) in enumerate(MV1_BLOCKS, 1):
        assert model.model[i][0].stride == (stride, stride) and model.model[i][0].groups == MV1_BLOCKS[i - 1][0]
    assert model.model[0][0].stride == (2, 2)
    assert [type(m) for m in model.model[1]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert model.preact_bn == {"stage1_preact": "model.3.4", "stage2_preact": "model.5.4",
                               "stage3_preact": "model.11.4", "stage4_preact": "model.13.4"}

    # a state dict in that layout loads strictly and reproduces the outputs
    torch.manual_seed(0)
    source = create_model("mobilenet_v1", num_classes=1000)
    with torch.no_grad():
        source.train()(_input(seed=1))
    model.load_state_dict(source.state_dict(), strict=True)
    x = _input()
    with torch.no_grad():
        logits, feats = _features(model.eval(), x)
        assert torch.equal(logits, source.eval()(x))
    assert logits.shape == (2, 1000)
    # the taps sit where mdistiller's features are: after blocks 3, 5, 11 and 13
    with torch.no_grad():
        assert torch.equal(feats["stem"], model.model[0](x))
        assert torch.equal(feats["stage1"], model.model[1:4](feats["stem"]))
        assert torch.equal(feats["stage2"], model.model[4:6](feats["stage1"]))
        assert torch.equal(feats["stage3"], model.model[6:12](feats["stage2"]))
        assert torch.equal(feats["last_stage_first_block"], model.model[12](feats["stage3"]))
        assert torch.equal(feats["stage4"], model.model[13](feats["last_stage_first_block"]))
        assert torch.equal(feats["pre_pool"], feats["stage4"])
        assert torch.equal(feats["pooled"], feats["stage4"].mean((2, 3)))


def test_whole_map_pool_is_mdistillers_avgpool7_at_224():
    x = torch.randn(2, 1024, 7, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(WholeMapAvgPool()(x), nn.AvgPool2d(7)(x))
    small = torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(WholeMapAvgPool()(small), small.mean((2, 3), keepdim=True))


# ------------------------------------------------------------------------------------------------------ registry


def test_registry_lists_and_creates_the_imagenet_models():
    cifar = list_models(input_size=32)
    assert set(IMAGENET) <= set(list_models()) and not set(IMAGENET) & set(cifar)
    assert set(list_models(input_size=224)) == set(IMAGENET)
    assert list_models()[:3] == ["MobileNetV2", "resnet8", "resnet14"]  # the CIFAR zoo is listed first
    assert {"resnet20", "ResNet50", "MobileNetV2"} <= set(cifar)
    for name in IMAGENET:
        entry = model_entry(name)
        assert (entry.family, entry.base_lr, entry.input_size) == (FAMILIES[name], 0.1, 224)
    with torch.device("meta"):  # shapes only
        for name in IMAGENET:
            model = create_model(name, num_classes=1000)
            head = model.fc if hasattr(model, "fc") else model.classifier[1]
            assert head.out_features == 1000
            assert all(m in dict(model.named_modules()).values() for m in feature_modules(model))


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v2", "mobilenet_v1"])
def test_grayscale_changes_only_the_first_conv(name):
    gray, rgb = create_model(name, 10, in_channels=1), create_model(name, 10)
    diff = {k for k, v in gray.state_dict().items() if v.shape != rgb.state_dict()[k].shape}
    assert diff == {{"tv_resnet18": "conv1.weight", "tv_mobilenet_v2": "features.0.0.weight",
                     "mobilenet_v1": "model.0.0.weight"}[name]}
    with torch.no_grad():
        assert gray.eval()(_input(channels=1)).shape == (2, 10)


# ------------------------------------------------------------------------------------------- Tiny-ImageNet (mdistiller)

# mdistiller's mv2_tinyimagenet.py: (attribute, in, out, first stride, t, blocks); stage1 and stage7 are one
# LinearBottleNeck each, not a Sequential
MV2_TINY_STAGES = [("stage1", 32, 16, 1, 1, None), ("stage2", 16, 24, 2, 6, 2), ("stage3", 24, 32, 2, 6, 3),
                   ("stage4", 32, 64, 2, 6, 4), ("stage5", 64, 96, 1, 6, 3), ("stage6", 96, 160, 1, 6, 3),
                   ("stage7", 160, 320, 1, 6, None)]


def _bn_shapes(prefix, width):
    return {f"{prefix}.{k}": () if k == "num_batches_tracked" else (width,) for k in _BN}


def _mdistiller_mv2_tiny_shapes(num_classes=200):
    """{key: shape} of mdistiller's Tiny-ImageNet MobileNetV2: every conv has a bias; ``residual`` holds pw conv, BN,
    ReLU6, dw conv, BN, ReLU6, pw conv, BN."""
    shapes = {"pre.0.weight": (32, 3, 1, 1), "pre.0.bias": (32,), **_bn_shapes("pre.1", 32)}
    for stage, inp, oup, _, t, blocks in MV2_TINY_STAGES:
        for i in range(blocks or 1):
            c_in, hidden = (inp if i == 0 else oup), (inp if i == 0 else oup) * t
            prefix = f"{stage}.residual" if blocks is None else f"{stage}.{i}.residual"
            shapes.update({f"{prefix}.0.weight": (hidden, c_in, 1, 1), f"{prefix}.0.bias": (hidden,),
                           **_bn_shapes(f"{prefix}.1", hidden),
                           f"{prefix}.3.weight": (hidden, 1, 3, 3), f"{prefix}.3.bias": (hidden,),
                           **_bn_shapes(f"{prefix}.4", hidden),
                           f"{prefix}.6.weight": (oup, hidden, 1, 1), f"{prefix}.6.bias": (oup,),
                           **_bn_shapes(f"{prefix}.7", oup)})
    shapes.update({"conv1.0.weight": (1280, 320, 1, 1), "conv1.0.bias": (1280,), **_bn_shapes("conv1.1", 1280),
                   "conv2.weight": (num_classes, 1280, 1, 1), "conv2.bias": (num_classes,)})
    return shapes


def test_mobilenetv2_tinyimagenet_is_mdistillers():
    torch.manual_seed(0)
    model = create_model("mobilenetv2_tinyimagenet", num_classes=200)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _mdistiller_mv2_tiny_shapes()
    for stage, _, _, stride, _, blocks in MV2_TINY_STAGES:
        first = model.get_submodule(stage if blocks is None else f"{stage}.0")
        assert first.residual[3].stride == (stride, stride)
    entry = model_entry("mobilenetv2_tinyimagenet")
    assert (entry.input_size, entry.base_lr, entry.family) == (64, 0.2, "mobilenetv2_tinyimagenet")

    with torch.no_grad():
        model.train()(_input(seed=1))  # BN statistics away from their defaults
        model.eval()
        x = _input()
        logits, feats = _features(model, x)
        # mdistiller's forward: f0 = pre, f1..f3 after stage2..stage4, f4 after conv1, conv2 on the pooled map
        f0 = model.pre(x)
        f1 = model.stage2(model.stage1(f0))
        f2 = model.stage3(f1)
        f3 = model.stage4(f2)
        f4 = model.conv1(model.stage7(model.stage6(model.stage5(f3))))
        expected = model.conv2(F.adaptive_avg_pool2d(f4, 1)).view(2, -1)
    assert torch.equal(logits, expected) and logits.shape == (2, 200)
    for tap, tensor in zip(["stem", "stage1", "stage2", "stage3", "stage4"], [f0, f1, f2, f3, f4]):
        assert torch.equal(feats[tap], tensor), tap
    for stage in ("stage1", "stage2", "stage3"):
        assert feats[f"{stage}_preact"] is feats[stage]
    assert feats["stage4_preact"].min() < 0 and torch.equal(F.relu6(feats["stage4_preact"]), feats["stage4"])
    assert torch.equal(feats["pre_pool"], f4) and torch.equal(feats["pooled"], f4.mean((2, 3)))


def _mdistiller_resnet18_keys():
    """state_dict keys of mdistiller's (CIFAR) ``resnetv2.ResNet18``: BasicBlocks with a ``shortcut`` projection
    where the shape changes (the first block of layers 2-4), ``linear`` head."""
    keys = ["conv1.weight", *[f"bn1.{k}" for k in _BN]]
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            keys += [f"{prefix}.conv1.weight", *[f"{prefix}.bn1.{k}" for k in _BN],
                     f"{prefix}.conv2.weight", *[f"{prefix}.bn2.{k}" for k in _BN]]
            if layer > 1 and block == 0:
                keys += [f"{prefix}.shortcut.0.weight", *[f"{prefix}.shortcut.1.{k}" for k in _BN]]
    return keys + ["linear.weight", "linear.bias"]


def test_resnet18_is_mdistillers_tiny_imagenet_teacher():
    model = create_model("ResNet18", num_classes=200).eval()
    assert list(model.state_dict()) == _mdistiller_resnet18_keys()
    assert model.linear.weight.shape == (200, 512) and model.conv1.weight.shape == (64, 3, 3, 3)
    assert model.preact_bn == {f"stage{i}_preact": f"layer{i}.1.bn2" for i in range(1, 5)}
    shapes = feature_shapes(model, (3, 64, 64))
    assert [shapes[s] for s in ("stem", "stage1", "stage2", "stage3", "stage4")] == [
        (64, 64, 64), (64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8)]
    with torch.no_grad():
        _, feats = _features(model, _input())
        assert torch.equal(feats["stage2"], model.layer2(feats["stage1"])[0])
    for stage in stage_names(model):
        assert feats[f"{stage}_preact"].min() < 0 and torch.equal(F.relu(feats[f"{stage}_preact"]), feats[stage])


def test_shufflev2_does_not_run_on_tiny_imagenet_images():
    """As kdbench.models.tinyimagenet says: the CIFAR head's avg_pool2d(4) leaves 2x2 at 64x64, as in mdistiller."""
    with torch.no_grad(), pytest.raises(RuntimeError, match="4096 and 1024x200"):
        create_model("ShuffleV2", num_classes=200).eval()(_input())


@pytest.mark.parametrize("pair", [("tv_resnet34", "tv_resnet18"), ("tv_resnet50", "mobilenet_v1")])
def test_every_method_plans_on_the_imagenet_pairs_or_is_refused_in_one_line_naming_why(pair):
    """Planning builds each method on the pair's feature shapes at 224 (on the meta device), so a method that could
    not train is refused before anything trains. Which are refused is pinned, so a change shows here."""
    from conftest import tiny_sweep

    from kdbench.errors import KdbenchError
    from kdbench.methods import list_methods, method_class
    from kdbench.spec import RECIPES

    refused = {}
    # the shipped methods: other test files of this worker may have registered plug-ins of their own
    for method in [m for m in list_methods() if method_class(m).__module__.startswith("kdbench.methods.")]:
        try:
            tiny_sweep(methods=(method,), pair=pair, dataset="imagenet", recipe=RECIPES.get("imagenet")).plan()
        except KdbenchError as e:
            assert "\n" not in str(e) and (pair[1] in str(e) or method in str(e)), str(e)
            refused[method] = str(e)
    # no default assistant chain; MLKD's strong view is made by the 32x32 loader only; equal channels needed
    expected = {"takd", "dgkd", "mlkd", "mlkd_ls"} | ({"fsp", "kdsvd"} if pair[1] == "mobilenet_v1" else set())
    assert set(refused) == expected, refused
