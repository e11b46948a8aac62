"""OFD (methods/ofd.py) and the models' ``preact_bn`` declarations: margins against E[x | x < 0] by numerical
integration, the partial L2 against hand computations, gradients, sizes, every reference pair, presets, the
ShuffleNet-teacher error, a state round trip, and one short run through the harness."""

import functools
import math

import pytest
import torch
from conftest import method_context, random_features, step, tiny_sweep
from test_methods_e2e import REFERENCE_PAIRS
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.harness import batch_statistics, run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import Preparation
from kdbench.methods.ofd import bn_margin, partial_l2
from kdbench.models import create_model, list_models
from kdbench.models.taps import FeatureExtractor, feature_shapes
from kdbench.spec import Recipe

OFD = method_class("ofd")
SHUFFLENETS = ("ShuffleV1", "ShuffleV2")


@functools.lru_cache(maxsize=None)
def shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return feature_shapes(create_model(arch, num_classes=100), (3, 32, 32))


@functools.lru_cache(maxsize=None)
def teacher_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, num_classes=100).eval().requires_grad_(False)


def preparation(teacher: nn.Module) -> Preparation:
    return Preparation(None, None, None, None, torch.device("cpu"), teacher_model=teacher)


def build(student, teacher, protocol="crd", options=None, prepare=True):
    """An OFD on zoo models (names) or made-up tap shapes (dicts); prepared from the zoo teacher when named."""
    s = shapes(student) if isinstance(student, str) else student
    t = shapes(teacher) if isinstance(teacher, str) else teacher
    method = OFD(method_context("ofd", s, t, protocol, options))
    if prepare and isinstance(teacher, str):
        method.prepare(preparation(teacher_model(teacher)))
    return method




# --------------------------------------------------------------------------------------------------------- margins


def truncated_mean_by_integration(m: float, s: float) -> float:
    """E[x | x < 0] for x ~ N(m, s²), integrating x·pdf and pdf over [m − 12s, 0] (trapezoid, float64)."""
    x = torch.linspace(min(m - 12 * s, -1e-9), 0.0, 400_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((x - m) / s) ** 2)
    return (torch.trapezoid(x * pdf, x) / torch.trapezoid(pdf, x)).item()


# (γ, β): centred, negative and positive means, a negative γ (|γ| is the std), both sides of P(x < 0) = 0.001
# (β/|γ| = 3.0902), and the −3|γ| branch far beyond it
MARGIN_CASES = [(1.0, 0.0), (0.5, -1.0), (2.0, 1.5), (-0.7, 0.4), (1.0, 3.0), (1.0, 3.2), (0.25, 5.0)]


def test_margins_match_the_closed_form_and_its_minus_three_sigma_branch():
    gamma = torch.tensor([g for g, _ in MARGIN_CASES])
    beta = torch.tensor([b for _, b in MARGIN_CASES])
    margins = bn_margin(gamma, beta)
    assert margins.dtype == torch.float32
    for (g, b), margin in zip(MARGIN_CASES, margins.tolist()):
        s = abs(g)
        tail = 0.5 * math.erfc(b / s / math.sqrt(2))  # P(x < 0)
        expected = truncated_mean_by_integration(b, s) if tail > 0.001 else -3 * s
        assert margin == pytest.approx(expected, rel=1e-5, abs=1e-6), (g, b)
        assert margin < 0
    assert margins[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # half-normal mean
    assert margins[4].item() != pytest.approx(-3.0, rel=0.1) and margins[5].item() == pytest.approx(-3.0)


def test_prepare_reads_the_declared_bns_and_leaves_the_teacher_unchanged():
    teacher = create_model("resnet20", num_classes=100).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    for path in teacher.preact_bn.values():
        bn = teacher.get_submodule(path)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.1)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = build("resnet8", "resnet20", prepare=False)
    method.prepare(preparation(teacher))
    assert method.teacher_taps == ("stage1_preact", "stage2_preact", "stage3_preact")
    for margin, tap in zip(method.margins(), method.teacher_taps):
        bn = teacher.get_submodule(teacher.preact_bn[tap])
        assert torch.equal(margin, bn_margin(bn.weight, bn.bias))
    assert bool(method.fitted) and not teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_margins_survive_a_state_round_trip_without_prepare():
    method = build("resnet8x4", "resnet32x4")
    resumed = build("resnet8x4", "resnet32x4", prepare=False)
    with pytest.raises(RuntimeError, match="prepare\\(\\) has not computed the teacher's margins"):
        resumed.losses(step(resumed, *random_features(resumed, 2), 2))
    resumed = build("resnet8x4", "resnet32x4", prepare=False)
    resumed.load_state_dict(method.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.margins(), method.margins()))
    f_s, f_t = random_features(method, 2)
    assert resumed.losses(step(resumed, f_s, f_t, 2))["ofd"].item() == pytest.approx(
        method.losses(step(method, f_s, f_t, 2))["ofd"].item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------- partial L2


def test_partial_l2_covers_the_three_indicator_cases():
    # one channel, margin −1; per position (s, t) and the hand value of d:
    cases = [(0.5, -2.0, 1.5**2),  # t ≤ m, s > m: (s − m)²
             (-1.5, -2.0, 0.0),  # t ≤ m, s ≤ m: the student is "off" enough
             (0.3, -0.5, 0.8**2),  # m < t ≤ 0, s > t: (s − t)²
             (-0.7, -0.5, 0.0),  # m < t ≤ 0, s ≤ t
             (0.0, 0.0, 0.0),  # t = 0 is "off": s = t contributes nothing
             (3.0, 1.0, 4.0), (-1.0, 1.0, 4.0)]  # t > 0: (s − t)² on both sides
    s = torch.tensor([c[0] for c in cases]).reshape(1, 1, 1, -1)
    t = torch.tensor([c[1] for c in cases]).reshape(1, 1, 1, -1)
    expected = sum(c[2] for c in cases)
    assert partial_l2(s, t, torch.tensor([-1.0])).item() == pytest.approx(expected)
    # summed over C·H·W, divided by B: a batch of the same sample twice gives the same value
    assert partial_l2(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1), torch.tensor([-1.0])).item() == pytest.approx(
        expected)
    # the margin is per channel: with m = −3 the two t = −2 positions move to the middle case, (s − t)² where s > t
    two = partial_l2(torch.cat([s, s], 1), torch.cat([t, t], 1), torch.tensor([-1.0, -3.0])).item()
    assert two == pytest.approx(2 * expected - 1.5**2 + (0.5 + 2) ** 2 + (-1.5 + 2) ** 2)


def test_partial_l2_equals_the_three_indicator_form():
    """mdistiller ``feat_loss``'s form: (s−m)²·1(s>m ∧ t≤m) + (s−t)²·1(s>t ∧ m<t≤0) + (s−t)²·1(t>0), per-sample sum."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 5, 3, 3, generator=g) * 2, torch.randn(4, 5, 3, 3, generator=g) * 2
    m = -torch.rand(5, generator=g) * 2
    mm = m.reshape(1, -1, 1, 1)
    d = ((s - mm) ** 2 * ((s > mm) & (t <= mm)) + (s - t) ** 2 * ((s > t) & (t > mm) & (t <= 0))
         + (s - t) ** 2 * (t > 0))
    assert partial_l2(s, t, m).item() == pytest.approx(d.sum().item() / 4, rel=1e-6)


def identity_connectors(method):
    """Connectors that pass the student map through unchanged (eval-mode BN with var 1 − eps)."""
    for conv, bn in method.connectors:
        nn.init.eye_(conv.weight.reshape(conv.weight.shape[:2]))
        bn.running_var.fill_(1 - bn.eps)
    method.eval()


def test_ofd_weights_stages_pools_the_teacher_and_scales_by_beta():
    # two stages of one channel; the teacher's maps are twice the student's size and are average-pooled to it
    student = {"stage1": (1, 1, 2), "stage1_preact": (1, 1, 2), "stage2": (1, 1, 1), "stage2_preact": (1, 1, 1)}
    teacher = {"stage1": (1, 2, 4), "stage1_preact": (1, 2, 4), "stage2": (1, 2, 2), "stage2_preact": (1, 2, 2)}
    method = build(student, teacher, protocol="semckd", prepare=False)
    identity_connectors(method)
    method.margin0.fill_(-1.0)
    method.margin1.fill_(-2.0)
    method.fitted.fill_(True)
    s1, s2 = torch.tensor([[[[0.5, 2.0]]]]), torch.tensor([[[[1.0]]]])
    t1 = torch.tensor([[[[-3.0, -1.0, 1.0, 3.0], [-3.0, -1.0, 1.0, 3.0]]]])  # pooled: (−2, 2)
    t2 = torch.tensor([[[[-1.0, 0.0], [-1.0, 0.0]]]])  # pooled: −0.5
    stage1 = (0.5 + 1) ** 2 + (2.0 - 2.0) ** 2  # t ≤ m: (s − m)²; t > 0: (s − t)²
    stage2 = (1.0 + 0.5) ** 2  # m < t ≤ 0, s > t
    terms = method.losses(step(method, {"stage1_preact": s1, "stage2_preact": s2},
                               {"stage1_preact": t1, "stage2_preact": t2}, 1))
    assert set(terms) == {"ce", "kd", "ofd"}
    assert terms["ofd"].item() == pytest.approx(0.001 * (stage1 / 2 + stage2), rel=1e-6)


def test_connector_init_and_deep_alignment():
    method = build("resnet8x4", "ResNet50", prepare=False)  # 3 student stages, 4 teacher stages: the last three
    assert method.student_taps == ("stage1_preact", "stage2_preact", "stage3_preact")
    assert method.teacher_taps == ("stage2_preact", "stage3_preact", "stage4_preact")
    torch.manual_seed(0)
    conv, bn = build({"stage1": (64, 4, 4), "stage1_preact": (64, 4, 4)},
                     {"stage1": (2048, 4, 4), "stage1_preact": (2048, 4, 4)}, prepare=False).connectors[0]
    assert conv.kernel_size == (1, 1) and conv.bias is None
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.02)
    assert abs(conv.weight.mean().item()) < 1e-3
    assert torch.equal(bn.weight, torch.ones(2048)) and torch.equal(bn.bias, torch.zeros(2048))


# ----------------------------------------------------------------------------------------- gradients and sizes


def test_gradients_reach_the_student_and_the_connectors_never_the_teacher():
    method = build("resnet8x4", "resnet32x4", protocol="semckd")
    f_s, f_t = random_features(method, 3, requires_grad=True)
    terms = method.losses(step(method, f_s, f_t, 3))
    terms["ofd"].backward()
    for name, feature in f_s.items():
        assert feature.grad is not None and feature.grad.abs().sum() > 0, name
    assert all(f.grad is None for f in f_t.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())
    assert not any(b.requires_grad for b in method.buffers())


@pytest.mark.parametrize("teacher, student, params", [("vgg13", "vgg8", 609_024), ("resnet32x4", "resnet8x4", 86_912)])
def test_aux_parameter_counts_match_the_spec(teacher, student, params):
    method = build(student, teacher, prepare=False)
    assert method.extra_params_train() == params and method.extra_params_inference() == 0


# ------------------------------------------------------------------------------------ every pair, presets, errors


@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_every_reference_pair_builds_and_its_losses_run(pair):
    teacher, student = pair
    method = build(student, teacher)
    depth = min(len([n for n in shapes(s) if n.endswith("_preact")]) for s in pair)
    assert len(method.student_taps) == len(method.teacher_taps) == len(method.connectors) == depth
    assert all(m.max().item() <= 0 for m in method.margins())
    f_s, f_t = random_features(method, 3)
    terms = method.losses(step(method, f_s, f_t, 3))
    assert set(terms) == {"ce", "ofd"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    assert terms["ofd"].item() > 0


def test_terms_are_fp32_under_bf16_autocast():
    method = build("resnet8x4", "resnet32x4")
    f_s, f_t = random_features(method, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.losses(step(method, {k: v.bfloat16() for k, v in f_s.items()},
                                   {k: v.bfloat16() for k, v in f_t.items()}, 2))
    assert terms["ofd"].dtype == torch.float32 and torch.isfinite(terms["ofd"])


@pytest.mark.parametrize("protocol, ce, kd", [("official", 1.0, 0.0), ("crd", 1.0, 0.0), ("semckd", 1.0, 1.0)])
def test_presets_resolve_to_the_spec_weights(protocol, ce, kd):
    for teacher, student in REFERENCE_PAIRS:
        options = dict(OFD.resolve_options({}, protocol, teacher, student))
        assert (options["ce_weight"], options["kd_weight"], options["beta"]) == (ce, kd, 0.001)
        assert options["temperature"] == 4.0 and options["kl_reduction"] == "batchmean"
        assert options["teacher_batch_stats"] is False  # eval-mode teacher unless asked (the labelled deviation)
    assert OFD.family == "feature" and OFD.label(options) == ("ofd (+KD)" if kd else "ofd")


@pytest.mark.parametrize("teacher", SHUFFLENETS)
def test_a_shufflenet_teacher_is_refused_in_one_line_naming_it(teacher):
    message = f"ofd cannot learn from the teacher {teacher}: its margins need the BatchNorm before each stage's ReLU"
    with pytest.raises(KdbenchError, match=message) as error:
        OFD.resolve_options({}, "crd", teacher, "resnet8x4")
    assert "\n" not in str(error.value)
    with pytest.raises(KdbenchError, match=message):
        tiny_sweep(methods=("ofd",), pair=(teacher, "resnet8x4")).plan()
    # the model itself, handed to prepare by a caller that skipped the plan
    method = build("resnet8x4", teacher, prepare=False)
    with pytest.raises(KdbenchError, match="ofd cannot learn from the teacher ShuffleNet"):
        method.prepare(preparation(create_model(teacher, num_classes=100).eval()))
    assert OFD.resolve_options({}, "crd", "resnet32x4", teacher)  # as a student it is fine


# ----------------------------------------------------------------------------------- the models' preact_bn


@pytest.mark.parametrize("arch", list_models())
def test_every_declared_preact_bn_is_the_bn_feeding_that_preact_tap(arch):
    """Each declared path is a BatchNorm2d with the tap's channel count, and shifting its bias by δ shifts the tap by
    exactly δ (eval mode): its output reaches the preact tap with no operation but an added shortcut."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=100).eval().double()  # untrained deep maps reach 1e8: float64
    taps = [n for n in model.feature_taps if n.endswith("_preact")]
    if arch in SHUFFLENETS:
        assert not hasattr(model, "preact_bn")
        return
    assert sorted(model.preact_bn) == sorted(taps)
    extractor = FeatureExtractor(model, taps)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _, before = extractor(x)
        for tap, path in model.preact_bn.items():
            bn = model.get_submodule(path)
            assert type(bn) is nn.BatchNorm2d and bn.num_features == before[tap].shape[1], (tap, path)
            bn.bias.add_(0.5)
            _, after = extractor(x)
            bn.bias.sub_(0.5)
            assert torch.allclose(after[tap] - before[tap], torch.full_like(before[tap], 0.5), atol=1e-6), (tap, path)


# ------------------------------------------------------------------------------------------------- the harness


def test_a_short_run_prepares_margins_from_the_harness_teacher(env, monkeypatch):
    seen = {}
    real_prepare = OFD.prepare

    def prepare(self, prep):
        seen["teacher"] = prep.teacher_model
        real_prepare(self, prep)
        seen["margins"] = [m.clone() for m in self.margins()]

    monkeypatch.setattr(OFD, "prepare", prepare)
    recipe = Recipe("ofd-few", epochs=1, batch_size=16, train_subset=32, test_subset=16, warmup_steps=0)
    teacher, student = tiny_sweep(methods=("ofd",), recipe=recipe).plan()
    record = run_sweep([teacher, student], env)[1]
    assert record.status == "finished", record.error
    model = seen["teacher"]
    assert type(model).__name__ == "ResNet" and not model.training
    for margin, tap in zip(seen["margins"], ("stage1_preact", "stage2_preact", "stage3_preact")):
        bn = model.get_submodule(model.preact_bn[tap])
        assert torch.equal(margin, bn_margin(bn.weight, bn.bias))
    assert math.isfinite(record.epochs[0]["loss_ofd"]) and record.epochs[0]["loss_ofd"] > 0


def test_batch_statistics_normalise_with_the_batch_and_leave_the_teacher_as_it_was():
    torch.manual_seed(0)
    teacher = create_model("resnet14", 10, 3)
    teacher(torch.randn(64, 3, 32, 32) * 3 + 1)  # running statistics that differ from the next batch's
    teacher.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(16, 3, 32, 32)
    copy = create_model("resnet14", 10, 3)
    copy.load_state_dict(before)
    reference = copy.train()(x)  # train mode: batch statistics (and, unlike the context, drifting running ones)
    with torch.no_grad(), batch_statistics([teacher]):
        inside = teacher(x)
    assert torch.allclose(inside, reference, atol=1e-5)
    assert not torch.allclose(teacher(x), reference, atol=1e-3)  # outside: running statistics again
    assert not any(m.training for m in teacher.modules())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # counters included
    with batch_statistics([teacher], enabled=False):
        assert torch.equal(teacher(x), teacher.eval()(x))


def test_teacher_batch_stats_runs_the_teacher_on_batch_statistics_and_keeps_it_frozen(env, monkeypatch):
    modes = []  # per training step after prepare: did the teacher's BNs normalise with the batch's statistics?
    real_prepare = OFD.prepare

    def prepare(self, prep):
        real_prepare(self, prep)
        bn = prep.teacher_model.get_submodule(prep.teacher_model.preact_bn["stage1_preact"])
        bn.register_forward_hook(lambda m, *_: modes.append(m.training and not m.track_running_stats))

    monkeypatch.setattr(OFD, "prepare", prepare)
    recipe = Recipe("ofd-few", epochs=1, batch_size=16, train_subset=32, test_subset=16, warmup_steps=0)
    teacher, student = tiny_sweep(methods=("ofd",), recipe=recipe,
                                  method_options=(("ofd", "teacher_batch_stats", "true"),)).plan()
    record = run_sweep([teacher, student], env)[1]  # the harness fails a run whose frozen teacher changed
    assert record.status == "finished", record.error
    assert modes == [True, True]  # both steps (32 images, batch 16)
    assert dict(record.spec.method_options)["teacher_batch_stats"] is True
    assert "batch statistics" in record.provenance["method_note"]
