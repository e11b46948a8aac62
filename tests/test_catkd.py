"""CAT-KD (methods/catkd.py): class activation maps as the classifier on the pooled map, the CAT loss against hand
computations, per-pair settings, gradients, its labelled deviation, and a run through the harness."""

import math

import pytest
import torch
from conftest import method_context, tiny_sweep
from test_zoo_e2e import FEW_STEPS

from kdbench.harness import run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import Preparation, StepOutputs
from kdbench.methods.catkd import cat_loss, class_activation_maps
from kdbench.models import create_model
from kdbench.models.taps import FeatureExtractor, feature_shapes

CATKD = method_class("catkd")


def test_cams_pooled_are_the_logits_without_the_bias():
    """A CAM is the classifier as a 1×1 convolution before the pooling: pooled, it is the logit less the bias."""
    torch.manual_seed(0)
    model = create_model("resnet8", 100).eval()
    logits, feats = FeatureExtractor(model, ("pre_pool",))(torch.randn(2, 3, 32, 32))
    cams = class_activation_maps(feats["pre_pool"], model.fc.weight)
    assert cams.shape == (2, 100, 8, 8)
    assert torch.allclose(cams.mean((2, 3)), logits - model.fc.bias, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_cat_loss_matches_a_hand_computation(normalize):
    s = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 10
    t = torch.cos(s)
    expected = 0.0
    for n in range(2):
        for c in range(3):
            cells_s = [s[n, c, i:i + 2, j:j + 2].mean().item() for i in (0, 2) for j in (0, 2)]
            cells_t = [t[n, c, i:i + 2, j:j + 2].mean().item() for i in (0, 2) for j in (0, 2)]
            if normalize:
                norm_s, norm_t = (sum(v * v for v in cells) ** 0.5 for cells in (cells_s, cells_t))
                cells_s, cells_t = [v / norm_s for v in cells_s], [v / norm_t for v in cells_t]
            expected += sum((a - b) ** 2 for a, b in zip(cells_s, cells_t))
    assert cat_loss(s, t, 2, normalize).item() == pytest.approx(expected / (2 * 3 * 4), rel=1e-5)


def test_pair_settings_come_from_the_official_configs_under_every_protocol():
    for protocol in ("official", "crd", "semckd"):
        options = dict(CATKD.resolve_options({}, protocol, "resnet56", "resnet20"))
        assert (options["ce_weight"], options["kd_weight"], options["beta"], options["cam_resolution"],
                options["normalize"]) == (1.0, 0.0, 0.7, 2, False)
    assert dict(CATKD.resolve_options({}, "official", "vgg13", "vgg8"))["beta"] == 4.5
    shuffle = dict(CATKD.resolve_options({}, "official", "resnet32x4", "ShuffleV2"))
    assert (shuffle["beta"], shuffle["cam_resolution"], shuffle["normalize"]) == (600.0, 4, True)
    assert dict(CATKD.resolve_options({}, "official", "resnet14", "resnet8"))["beta"] == 400.0  # mdistiller's CFG
    assert "bias" in CATKD.deviation_of({})


def test_the_loss_trains_the_students_features_and_classifier_never_the_teacher():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 100), create_model("resnet14", 100).eval()
    s_shapes, t_shapes = feature_shapes(student, (3, 32, 32)), feature_shapes(teacher, (3, 32, 32))
    options = dict(CATKD.resolve_options({}, "official", "resnet14", "resnet8"))
    method = CATKD(method_context("catkd", s_shapes, t_shapes, "official", options, batch_size=2))
    method.prepare(Preparation(teacher=None, train_batches=None, plain_batches=None, cache_dir=None,
                               device=torch.device("cpu"), teacher_model=teacher))
    assert torch.equal(method.teacher_weight, teacher.fc.weight) and bool(method.fitted)
    method.attach(student)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, t_feats = FeatureExtractor(teacher, ("pre_pool",))(x)
    logits, s_feats = FeatureExtractor(student, ("pre_pool",))(x)
    terms = method.losses(StepOutputs(labels=torch.tensor([1, 2]), student_logits=logits, student_features=s_feats,
                                      teacher_logits=None, teacher_features=t_feats))
    assert set(terms) == {"ce", "cat"}
    expected = cat_loss(class_activation_maps(s_feats["pre_pool"], student.fc.weight),
                        class_activation_maps(t_feats["pre_pool"], teacher.fc.weight), 2, True)
    assert terms["cat"].item() == pytest.approx(400.0 * expected.item(), rel=1e-5)
    terms["cat"].backward()
    assert student.fc.weight.grad.abs().sum() > 0 and student.conv1.weight.grad.abs().sum() > 0
    assert student.fc.bias.grad is None  # the CAMs leave the bias out
    assert method.extra_params_train() == 0  # the student's classifier is the student's, not the method's


def test_catkd_trains_end_to_end(env):
    teacher, run = run_sweep(tiny_sweep(methods=("catkd",), pair=("resnet14", "resnet8"), recipe=FEW_STEPS).plan(),
                             env)
    assert run.status == "finished", run.error
    assert {k for k in run.epochs[0] if k.startswith("loss_")} == {"loss_ce", "loss_cat"}
    assert math.isfinite(run.epochs[0]["loss_cat"]) and run.epochs[0]["loss_cat"] > 0
    assert run.metrics["extra_params_train"] == 0
