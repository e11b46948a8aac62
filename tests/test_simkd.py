"""SimKD (methods/simkd.py): the projector's layout, the prediction through the teacher's classifier and the loss
against hand computations on real zoo models, spatial alignment, refusal of teachers whose classifier does not read
their last stage, and an end-to-end run whose deployed model counts the projector and the teacher's classifier."""

import pytest
import torch
import torch.nn.functional as F
from conftest import method_context, tiny_sweep
from test_zoo_e2e import FEW_STEPS

from kdbench.errors import KdbenchError
from kdbench.harness import run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import Preparation, StepOutputs
from kdbench.models import create_model
from kdbench.models.taps import FeatureExtractor, feature_shapes

SimKD = method_class("simkd")


def _built(teacher_arch: str, student_arch: str, **options):
    torch.manual_seed(0)
    student, teacher = create_model(student_arch, 100), create_model(teacher_arch, 100).eval()
    s_shapes, t_shapes = feature_shapes(student, (3, 32, 32)), feature_shapes(teacher, (3, 32, 32))
    resolved = {**dict(SimKD.resolve_options({}, "official", teacher_arch, student_arch)), **options}
    method = SimKD(method_context("simkd", s_shapes, t_shapes, "official", resolved, batch_size=4))
    method.prepare(Preparation(teacher=None, train_batches=None, plain_batches=None, cache_dir=None,
                               device=torch.device("cpu"), teacher_model=teacher))
    return method, student, teacher


def test_the_projector_is_laid_out_as_the_official_one():
    """SimKD's ``transfer``: 1×1 C_s→C_t/f, BN, ReLU, 3×3 C_t/f→C_t/f, BN, ReLU, 1×1 C_t/f→C_t, BN, ReLU; no biases."""
    method, _, _ = _built("resnet32x4", "resnet8x4", factor=4)  # 256 -> 256 channels, 64 in the middle
    shapes = {k: tuple(v.shape) for k, v in method.transfer.state_dict().items() if k.endswith("weight")}
    assert shapes == {"0.weight": (64, 256, 1, 1), "1.weight": (64,), "3.weight": (64, 64, 3, 3), "4.weight": (64,),
                      "6.weight": (256, 64, 1, 1), "7.weight": (256,)}
    assert [type(m).__name__ for m in method.transfer] == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    assert method.extra_params_train() == sum(p.numel() for p in method.transfer.parameters())


def test_the_teachers_classifier_is_copied_frozen_and_kept_in_the_state():
    method, _, teacher = _built("resnet56", "resnet20")
    assert torch.equal(method.classifier.weight, teacher.fc.weight) and torch.equal(method.classifier.bias,
                                                                                   teacher.fc.bias)
    assert not any(p.requires_grad for p in method.classifier.parameters())
    state = method.state_dict()
    assert {"classifier.weight", "classifier.bias", "fitted"} <= set(state) and bool(state["fitted"])
    assert method.extra_params_inference() == sum(p.numel() for p in method.transfer.parameters()) + 64 * 100 + 100


@pytest.mark.parametrize("teacher, student", [("resnet56", "resnet20"), ("vgg13", "resnet8x4")])
def test_prediction_and_loss_match_a_hand_computation(teacher, student):
    """The hooked student returns classifier(avgpool(transfer(map))); the loss is β·mean((transfer(map) − t)²), the
    larger map average-pooled to the smaller one's size (vgg13's last stage is 2×2, resnet8x4's 8×8)."""
    method, model, frozen = _built(teacher, student, beta=3.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, t_feats = FeatureExtractor(frozen, method.teacher_taps)(x)
    method.attach(model)
    model.train()
    logits, s_feats = FeatureExtractor(model, method.student_taps)(x)
    student_map = s_feats[method.student_taps[0]]
    teacher_map = t_feats[method.teacher_taps[0]]
    size = min(student_map.shape[-1], teacher_map.shape[-1])
    source, target = F.adaptive_avg_pool2d(student_map, size), F.adaptive_avg_pool2d(teacher_map, size)
    projected = method.transfer(source)
    expected_logits = projected.mean((2, 3)) @ frozen_head(frozen).weight.t() + frozen_head(frozen).bias
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    terms = method.losses(StepOutputs(labels=torch.zeros(4, dtype=torch.long), student_logits=logits,
                                      student_features=s_feats, teacher_logits=None, teacher_features=t_feats))
    assert set(terms) == {"simkd"}  # CE and KD at weight 0
    assert terms["simkd"].item() == pytest.approx(3.0 * ((projected - target) ** 2).mean().item(), rel=1e-5)


def frozen_head(teacher):
    return teacher.fc if hasattr(teacher, "fc") else teacher.classifier


def test_a_teacher_whose_classifier_does_not_read_its_last_stage_is_refused_when_planned():
    refusal = r"^simkd cannot train the pair MobileNetV2:resnet8: simkd reuses the teacher's classifier on its last"
    with pytest.raises(KdbenchError, match=refusal) as err:
        tiny_sweep(methods=("simkd",), pair=("MobileNetV2", "resnet8"), recipe=FEW_STEPS).plan()
    assert "\n" not in str(err.value)


def test_simkd_trains_end_to_end_and_deploys_student_projector_and_teacher_classifier(env):
    teacher, run = run_sweep(tiny_sweep(methods=("simkd",), pair=("resnet14", "resnet8"),
                                        recipe=FEW_STEPS).plan(), env)
    assert run.status == "finished", run.error
    assert {k for k in run.epochs[0] if k.startswith("loss_")} == {"loss_simkd"}
    projector, head = run.metrics["extra_params_train"], 64 * 10 + 10  # synthetic data: 10 classes
    assert projector > 0 and run.metrics["inference_params"] == run.metrics["student_params"] + projector + head
    assert run.metrics["inference_macs"] > run.metrics["student_macs"]
    weights = env.store.load_torch(env.store.weights_path(run.run_id), "weights")
    assert {k.split(".")[0] for k in weights} == {"student", "transfer", "classifier"}
    taught = env.store.load_torch(env.store.weights_path(teacher.run_id), "weights")
    assert torch.equal(weights["classifier.weight"], taught["fc.weight"])
