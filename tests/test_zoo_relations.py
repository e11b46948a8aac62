"""CC, VID, RKD and PKT: losses against hand computations, gradient flow, parameter counts, reference pairs, presets."""

import math

import pytest
import torch
from conftest import method_context
from test_methods_e2e import REFERENCE_PAIRS

from kdbench.methods import method_class
from kdbench.methods.base import StepOutputs, kd_divergence
from kdbench.models import create_model
from kdbench.models.taps import feature_shapes

METHODS = ("cc", "vid", "rkd", "pkt")
FAMILIES = {"cc": "relation", "vid": "feature", "rkd": "relation", "pkt": "relation"}
OWN_TERMS = {"cc": {"cc"}, "vid": {"vid"}, "rkd": {"rkd_distance", "rkd_angle"}, "pkt": {"pkt"}}


@pytest.fixture(scope="module")
def zoo_shapes():
    names = {name for pair in REFERENCE_PAIRS for name in pair}
    return {name: feature_shapes(create_model(name, num_classes=100), (3, 32, 32)) for name in names}


def build(method, student_shapes, teacher_shapes, protocol="crd", options=None, batch_size=4):
    return method_class(method)(method_context(method, student_shapes, teacher_shapes, protocol, options,
                                               batch_size=batch_size))


def step(student_features, teacher_features, num_classes=10):
    batch = next(iter(student_features.values())).shape[0]
    return StepOutputs(torch.zeros(batch, dtype=torch.long), torch.randn(batch, num_classes), student_features,
                       torch.randn(batch, num_classes), teacher_features)


def random_features(shapes, taps, batch, requires_grad=False):
    return {tap: torch.randn(batch, *shapes[tap], requires_grad=requires_grad) for tap in taps}


def smooth_l1(a: float, b: float) -> float:
    diff = abs(a - b)
    return 0.5 * diff * diff if diff < 1 else diff - 0.5


# ------------------------------------------------------------------------------------------------ hand computations
def test_cc_is_the_mean_congruence_of_consecutive_pairs():
    pooled = {"pooled": (2,)}
    cc = build("cc", pooled, pooled, options={"embed_dim": 2})
    with torch.no_grad():
        for embed in (cc.embed_s, cc.embed_t):
            embed.weight.copy_(torch.eye(2))
            embed.bias.zero_()
    f_s = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 0.0]])
    f_t = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    # δ = |f_s − f_t| = [[1, 2], [2, 0], [2, 2]]: pairs (0, 1) and (1, 2) give 1·2 + 2·0 = 2 and 2·2 + 0·2 = 4
    assert cc.losses(step({"pooled": f_s}, {"pooled": f_t}))["cc"].item() == pytest.approx(0.02 * (2 + 4) / 2)
    # batch order matters: rows (0, 2, 1) pair δ0·δ2 = 1·2 + 2·2 = 6 and δ2·δ1 = 2·2 + 2·0 = 4
    order = torch.tensor([0, 2, 1])
    assert cc.losses(step({"pooled": f_s[order]}, {"pooled": f_t[order]}))["cc"].item() == pytest.approx(
        0.02 * (6 + 4) / 2)
    # a batch of one has no pair: 0, not NaN
    assert cc.losses(step({"pooled": f_s[:1]}, {"pooled": f_t[:1]}))["cc"].item() == 0.0


def test_vid_is_the_gaussian_negative_log_likelihood_with_pooling():
    # stage1: the student map is larger (pooled to 1×1); stage2: the teacher map is (pooled to 1×1)
    s_shapes, t_shapes = {"stage1": (1, 2, 2), "stage2": (1, 1, 1)}, {"stage1": (1, 1, 1), "stage2": (1, 2, 2)}
    vid = build("vid", s_shapes, t_shapes)
    assert vid.student_taps == vid.teacher_taps == ("stage1", "stage2")
    with torch.no_grad():
        for p in vid.parameters():
            if p.dim() == 4:
                p.fill_(1.0)  # the regressor passes its input through two ReLUs
        vid.stages[1].log_scale.zero_()  # σ² = softplus(0) + 1e-5 = ln 2 + 1e-5
    assert vid.stages[0].variance().item() == pytest.approx(5.0, rel=1e-7)
    f_s = {"stage1": torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]]),
           "stage2": torch.tensor([[[[2.0]]], [[[0.5]]]])}
    f_t = {"stage1": torch.tensor([[[[1.0]]], [[[1.0]]]]),
           "stage2": torch.tensor([[[[1.0, 2.0], [3.0, 2.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])}
    # stage1: μ = (3, relu(−1) = 0), target (1, 1); stage2: μ = (2, 0.5), target pooled (2, 0.5)
    var2 = math.log(2.0) + 1e-5
    stage1 = 0.5 * ((4 / 5 + 1 / 5) / 2 + math.log(5.0))
    stage2 = 0.5 * math.log(var2)
    assert vid.losses(step(f_s, f_t))["vid"].item() == pytest.approx(stage1 + stage2, rel=1e-6)


def test_vid_pairs_the_first_stages_of_both_models():
    s_shapes = {f"stage{k}": (4, 8 // k, 8 // k) for k in (1, 2, 3)}
    t_shapes = {f"stage{k}": (6, 8 // k, 8 // k) for k in (1, 2, 3, 4)}
    vid = build("vid", s_shapes, t_shapes)
    assert vid.student_taps == vid.teacher_taps == ("stage1", "stage2", "stage3") and len(vid.stages) == 3


def rkd_by_hand(student, teacher):
    """The distance and angle terms of RKD from lists of points, in plain Python."""
    def distances(points):
        n = len(points)
        d = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
        mean = sum(map(sum, d)) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def unit(a, b):
        diff = [y - x for x, y in zip(a, b)]
        norm = math.hypot(*diff)
        return [v / norm for v in diff] if norm else [0.0] * len(diff)

    def angles(points):
        n = len(points)
        e = [[unit(points[i], points[j]) for j in range(n)] for i in range(n)]
        return [sum(a * b for a, b in zip(e[i][j], e[i][k])) for i in range(n) for j in range(n) for k in range(n)]

    d_s, d_t = distances(student), distances(teacher)
    n = len(student)
    l_d = sum(smooth_l1(d_s[i][j], d_t[i][j]) for i in range(n) for j in range(n)) / n**2
    l_a = sum(smooth_l1(a, b) for a, b in zip(angles(student), angles(teacher))) / n**3
    return l_d, l_a


def test_rkd_matches_the_hand_computation():
    student = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0]]
    teacher = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, -1.0]]
    pooled = {"pooled": (2,)}
    rkd = build("rkd", pooled, pooled)
    terms = rkd.losses(step({"pooled": torch.tensor(student)}, {"pooled": torch.tensor(teacher)}))
    l_d, l_a = rkd_by_hand(student, teacher)
    assert l_d > 0 and l_a > 0
    assert terms["rkd_distance"].item() == pytest.approx(25 * l_d, rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(50 * l_a, rel=1e-5)
    # a 3-4-5 triangle: mean distance 4, so d̂ = (0.75, 1, 1.25) off the diagonal; a similar triangle matches it
    similar = rkd.losses(step({"pooled": torch.tensor(student[:3])}, {"pooled": torch.tensor(student[:3]) * 0.1 + 7}))
    assert similar["rkd_distance"].item() == pytest.approx(0.0, abs=1e-6)
    assert similar["rkd_angle"].item() == pytest.approx(0.0, abs=1e-6)
    # weights are options; a term of weight 0 is left out; a batch of one gives 0, not NaN
    only = build("rkd", pooled, pooled, options={"distance_weight": 2.0, "angle_weight": 0.0})
    terms = only.losses(step({"pooled": torch.tensor(student)}, {"pooled": torch.tensor(teacher)}))
    assert set(terms) == {"ce", "rkd_distance"} and terms["rkd_distance"].item() == pytest.approx(2 * l_d, rel=1e-5)
    single = rkd.losses(step({"pooled": torch.tensor(student[:1])}, {"pooled": torch.tensor(teacher[:1])}))
    assert single["rkd_distance"].item() == 0.0 and single["rkd_angle"].item() == 0.0


def test_rkd_student_mean_distance_carries_gradient():
    """The loss is invariant to scaling the student features only because the student's mean distance is part of
    the graph; then the gradient has no component along the features themselves (Euler's theorem)."""
    torch.manual_seed(0)
    pooled = {"pooled": (8,)}
    rkd = build("rkd", pooled, pooled, options={"angle_weight": 0.0})
    f_s, f_t = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    rkd.losses(step({"pooled": f_s}, {"pooled": f_t}))["rkd_distance"].backward()
    assert f_s.grad.norm() > 1e-3 and f_t.grad is None
    assert (f_s.grad * f_s).sum().item() == pytest.approx(0.0, abs=1e-5)


def test_pkt_matches_the_closed_form():
    pooled = {"pooled": (2,)}
    pkt = build("pkt", pooled, pooled)
    eps = 1e-7
    # student rows orthogonal: S' = [[1, ½], [½, 1]], P_s = [[⅔, ⅓], [⅓, ⅔]]; teacher rows equal: P_t = ½ everywhere
    f_s, f_t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    expected = sum(0.5 * math.log((0.5 + eps) / (p + eps)) for p in (2 / 3, 1 / 3, 1 / 3, 2 / 3)) / 4
    assert pkt.losses(step({"pooled": f_s}, {"pooled": f_t}))["pkt"].item() == pytest.approx(30000 * expected,
                                                                                            rel=1e-5)
    assert pkt.losses(step({"pooled": f_t * 2}, {"pooled": f_t}))["pkt"].item() == pytest.approx(0.0, abs=1e-6)


def test_pkt_zero_and_nan_rows_stay_finite():
    """A NaN row counts as zero (the reference's masking); an all-zero row has finite gradients (no sqrt at 0)."""
    pooled = {"pooled": (3,)}
    pkt = build("pkt", pooled, pooled)
    f_s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [0.5, 0.0, 1.0]], requires_grad=True)
    f_t = torch.tensor([[float("nan"), 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    loss = pkt.losses(step({"pooled": f_s}, {"pooled": f_t}))["pkt"]
    zeroed = pkt.losses(step({"pooled": f_s}, {"pooled": torch.cat([torch.zeros(1, 3), f_t[1:]])}))["pkt"]
    assert torch.isfinite(loss) and loss.item() == pytest.approx(zeroed.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ("rkd", "pkt"))
def test_relations_are_computed_in_fp32_under_autocast(method):
    """Gram matrices of wide features: autocast would run their matmuls in half precision."""
    torch.manual_seed(0)
    pooled = {"pooled": (512,)}
    m = build(method, pooled, pooled)
    f_s, f_t = torch.randn(6, 512).relu() * 30, torch.randn(6, 512).relu() * 30
    plain = m.losses(step({"pooled": f_s}, {"pooled": f_t}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = m.losses(step({"pooled": f_s.bfloat16()}, {"pooled": f_t.bfloat16()}))
    reference = m.losses(step({"pooled": f_s.bfloat16().float()}, {"pooled": f_t.bfloat16().float()}))
    for term in OWN_TERMS[method]:
        assert cast[term].dtype == torch.float32 and cast[term].item() == pytest.approx(reference[term].item(),
                                                                                        rel=1e-6)
        assert plain[term].item() == pytest.approx(reference[term].item(), rel=0.05)


# ------------------------------------------------------------------------------------------------- gradient flow
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_student_and_aux_modules_never_the_teacher(zoo_shapes, method):
    torch.manual_seed(0)
    s_shapes, t_shapes = zoo_shapes["resnet8x4"], zoo_shapes["resnet32x4"]
    m = build(method, s_shapes, t_shapes)
    f_s = random_features(s_shapes, m.student_taps, 4, requires_grad=True)
    f_t = random_features(t_shapes, m.teacher_taps, 4, requires_grad=True)
    terms = m.losses(step(f_s, f_t))
    assert set(terms) == {"ce"} | OWN_TERMS[method]
    sum(v for k, v in terms.items() if k != "ce").backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in f_s.values())
    assert all(f.grad is None for f in f_t.values())
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_vid_variances_are_trained_parameters_unless_fixed(zoo_shapes):
    s_shapes, t_shapes = zoo_shapes["resnet8x4"], zoo_shapes["resnet32x4"]
    learned = build("vid", s_shapes, t_shapes)
    # trainable parameters, so in the run's one SGD over method.parameters(), weight decay included (RepDistiller)
    names = {n for n, p in learned.named_parameters() if p.requires_grad}
    assert {"stages.0.log_scale", "stages.1.log_scale", "stages.2.log_scale"} <= names
    fixed = build("vid", s_shapes, t_shapes, options={"learn_variance": "false"})
    assert not any("log_scale" in n for n, _ in fixed.named_parameters())
    assert "stages.0.log_scale" in fixed.state_dict() and fixed.stages[0].variance()[0].item() == pytest.approx(5.0)


# ------------------------------------------------------------------------------------------ aux parameter counts
# methods-zoo.md §1 [computed]: vgg13→vgg8, resnet32x4→resnet8x4 (100 classes)
AUX_PARAMS = {"cc": (131_328, 65_792), "vid": (1_820_032, 258_496), "rkd": (0, 0), "pkt": (0, 0)}


@pytest.mark.parametrize("method", METHODS)
def test_aux_parameter_counts_match_the_reference(zoo_shapes, method):
    for (teacher, student), expected in zip((("vgg13", "vgg8"), ("resnet32x4", "resnet8x4")), AUX_PARAMS[method]):
        m = build(method, zoo_shapes[student], zoo_shapes[teacher])
        assert m.extra_params_train() == expected and m.extra_params_inference() == 0, (teacher, student)


def test_vid_with_fixed_variances_trains_what_mdistiller_trains(zoo_shapes):
    """mdistiller trains 1,818,624 / 258,048 parameters: the regressors, without the 1,408 / 448 variances."""
    for (teacher, student), expected in ((("vgg13", "vgg8"), 1_818_624), (("resnet32x4", "resnet8x4"), 258_048)):
        vid = build("vid", zoo_shapes[student], zoo_shapes[teacher], options={"learn_variance": False})
        assert vid.extra_params_train() == expected


# ------------------------------------------------------------------------------------------------ reference pairs
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_builds_and_runs_on_every_reference_pair(zoo_shapes, method, pair):
    torch.manual_seed(0)
    teacher, student = pair
    s_shapes, t_shapes = zoo_shapes[student], zoo_shapes[teacher]
    with torch.device("meta"):  # as the sweep's plan builds it
        build(method, s_shapes, t_shapes, batch_size=64)
    m = build(method, s_shapes, t_shapes, protocol="semckd", batch_size=3)
    out = step(random_features(s_shapes, m.student_taps, 3), random_features(t_shapes, m.teacher_taps, 3))
    terms = m.losses(out)
    assert set(terms) == {"ce", "kd"} | OWN_TERMS[method]
    assert all(t.dim() == 0 and t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    assert terms["kd"].item() == pytest.approx(kd_divergence(out.student_logits, out.teacher_logits).item())


# ------------------------------------------------------------------------------------------------------- presets
BETA = {"cc": 0.02, "vid": 1.0, "rkd": 1.0, "pkt": 30000.0}
OWN_DEFAULTS = {"cc": {"embed_dim": 128}, "vid": {"learn_variance": True},
                "rkd": {"distance_weight": 25.0, "angle_weight": 50.0}, "pkt": {}}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("protocol, ce, kd", [("official", 1.0, 0.0), ("crd", 1.0, 0.0), ("semckd", 1.0, 1.0)])
def test_presets_resolve_to_the_reference_weights(method, protocol, ce, kd):
    cls = method_class(method)
    assert cls.family == FAMILIES[method]
    for teacher, student in REFERENCE_PAIRS:
        options = dict(cls.resolve_options({}, protocol, teacher, student))
        assert (options["ce_weight"], options["kd_weight"], options["temperature"], options["beta"]) == (
            ce, kd, 4.0, BETA[method])
        assert OWN_DEFAULTS[method].items() <= options.items()


def test_cc_carries_the_code_version_note():
    assert "RepDistiller code" in method_class("cc").note
    assert dict(method_class("vid").resolve_options({"learn_variance": "false"}))["learn_variance"] is False
