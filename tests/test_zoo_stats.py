"""AT, SP, NST and KDSVD (methods/at.py, sp.py, nst.py, kdsvd.py): losses against hand computations and closed
forms, gradient flow, auxiliary sizes, every reference pair, presets and build-time errors."""

import functools
import math

import pytest
import torch
from conftest import method_context, random_features, step, tiny_sweep
from test_methods_e2e import REFERENCE_PAIRS

from kdbench.errors import KdbenchError
from kdbench.methods import method_class
from kdbench.methods.kdsvd import kdsvd_loss
from kdbench.models import create_model
from kdbench.models.taps import feature_shapes

METHODS = ("at", "sp", "nst", "kdsvd")
BETA = {"at": 1000.0, "sp": 3000.0, "nst": 50.0, "kdsvd": 1.0}  # the same under every protocol
CROSS_CHANNELS = {("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2")}  # KDSVD cannot run these


@functools.lru_cache(maxsize=None)
def shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        return feature_shapes(create_model(arch, num_classes=100), (3, 32, 32))


def build(method, student, teacher, protocol="crd", options=None, batch_size=64):
    s = shapes(student) if isinstance(student, str) else student
    t = shapes(teacher) if isinstance(teacher, str) else teacher
    return method_class(method)(method_context(method, s, t, protocol, options, batch_size))


def term(method, f_s, f_t, name, batch=1):
    """The method's own term divided by its weight, for one-stage hand-made maps on tap stage1."""
    out = step(method, {"stage1": f_s}, {"stage1": f_t}, batch)
    return method.losses(out)[name].item() / method.ctx.options["beta"]


def one_stage(shape):
    return {"stage1": shape}


# ------------------------------------------------------------------------------------------------- AT (hand)


def attention_by_hand(maps):
    """normalize_2(mean_c F²) of one sample given as a list of channels, each a flat list of positions."""
    energy = [sum(ch[i] ** 2 for ch in maps) / len(maps) for i in range(len(maps[0]))]
    norm = math.sqrt(sum(e * e for e in energy))
    return [e / norm for e in energy]


def test_at_matches_hand_computation_with_pooling_of_the_larger_map():
    # student 2 channels of 4x4, teacher 3 channels of 2x2: the student is pooled to 2x2 before the attention map
    s = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4) / 10 - 1
    t = torch.tensor([[[1.0, 2.0], [0.0, -1.0]], [[0.5, 0.5], [2.0, 1.0]], [[-1.0, 0.0], [1.0, 3.0]]])[None]
    pooled = [[sum(s[0, c, 2 * i + a, 2 * j + b].item() for a in (0, 1) for b in (0, 1)) / 4
               for i in (0, 1) for j in (0, 1)] for c in (0, 1)]
    a_s = attention_by_hand(pooled)
    a_t = attention_by_hand([t[0, c].flatten().tolist() for c in range(3)])
    expected = sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / 4
    at = build("at", one_stage((2, 4, 4)), one_stage((3, 2, 2)))
    assert term(at, s, t, "at") == pytest.approx(expected, rel=1e-5)
    # symmetric in which map is the larger one; blind to the sign and the scale of the maps
    swapped = build("at", one_stage((3, 2, 2)), one_stage((2, 4, 4)))
    assert term(swapped, t, s, "at") == pytest.approx(expected, rel=1e-5)
    same = build("at", one_stage((2, 4, 4)), one_stage((2, 4, 4)))
    assert term(same, s, -3 * s, "at") == pytest.approx(0.0, abs=1e-12)


def test_at_sums_its_stages_and_pairs_them_shallow_to_deep():
    at = build("at", "MobileNetV2", "ResNet50")
    assert at.student_taps == at.teacher_taps == ("stage1", "stage2", "stage3", "stage4")
    shuffle = build("at", "ShuffleV2", "resnet32x4")
    assert shuffle.student_taps == shuffle.teacher_taps == ("stage1", "stage2", "stage3")
    two = build("at", {"stage1": (1, 1, 2), "stage2": (1, 1, 2)}, {"stage1": (1, 1, 2), "stage2": (1, 1, 2)})
    one = torch.tensor([[[[1.0, 0.0]]]])
    other = torch.tensor([[[[0.0, 1.0]]]])
    out = step(two, {"stage1": one, "stage2": one}, {"stage1": other, "stage2": one}, 1)
    # stage 1: a_s = (1, 0), a_t = (0, 1): mean of squares 1; stage 2: 0
    assert two.losses(out)["at"].item() == pytest.approx(1000.0 * 1.0)


# ------------------------------------------------------------------------------------------------- SP (closed form)


def test_sp_matches_closed_form():
    # student rows orthogonal: Ĝ_s = I; teacher rows equal: every entry of Ĝ_t is 1/√2
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1)
    t = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).reshape(2, 2, 1, 1)
    r = 1 / math.sqrt(2)
    expected = (2 * (r - 1) ** 2 + 2 * r**2) / 4
    sp = build("sp", one_stage((2, 1, 1)), one_stage((2, 1, 1)))
    assert term(sp, s, t, "sp", batch=2) == pytest.approx(expected, rel=1e-6)
    # scale invariant per sample, and zero for proportional Gram matrices
    assert term(sp, s, 5 * s, "sp", batch=2) == pytest.approx(0.0, abs=1e-12)


def test_sp_is_bounded_by_4_over_b_and_keeps_a_smaller_last_batch():
    sp = build("sp", "resnet8x4", "resnet32x4", batch_size=64)
    assert sp.student_taps == sp.teacher_taps == ("stage3",) and not sp.needs_full_batches
    assert build("sp", "MobileNetV2", "ResNet50").student_taps == ("stage4",)
    for batch in (64, 16, 3):  # RepDistiller's final CIFAR-100 batch has 16 samples
        f_s, f_t = random_features(sp, batch, seed=batch)
        scaled = {"stage3": -2 * f_s["stage3"]}  # the same Gram matrix up to scale: the loss is 0
        assert sp.losses(step(sp, f_s, scaled, batch))["sp"].item() == pytest.approx(0.0, abs=1e-6)
        assert 0 < sp.losses(step(sp, f_s, f_t, batch))["sp"].item() / 3000 <= 4 / batch


# ------------------------------------------------------------------------------------------------ NST (closed form)


def test_nst_matches_closed_form():
    # teacher channels e1, e2; student channel (e1 + e2)/√2 after normalisation:
    # mean k(t, t) = (1 + 0 + 0 + 1)/4, mean k(s, s) = 1, mean k(s, t) = (1/2 + 1/2)/2  ->  1/2 + 1 − 1 = 1/2
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    s = torch.tensor([[3.0, 3.0]]).reshape(1, 1, 1, 2)
    nst = build("nst", one_stage((1, 1, 2)), one_stage((2, 1, 2)))
    assert term(nst, s, t, "nst") == pytest.approx(0.5, rel=1e-6)
    assert term(nst, s, 7 * t, "nst") == pytest.approx(0.5, rel=1e-6)  # each channel is normalised
    assert term(build("nst", one_stage((2, 1, 2)), one_stage((2, 1, 2))), t.flip(1), t, "nst") == pytest.approx(
        0.0, abs=1e-7)  # a channel permutation is not seen


def test_nst_equals_the_broadcast_kernel_and_pools_the_larger_map():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)

    def kernel(a, b):  # the reference's broadcast form: a B×C_b×C_a×HW tensor
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2).mean()

    ps = torch.nn.functional.normalize(torch.nn.functional.avg_pool2d(s, 2).flatten(2), dim=2)
    pt = torch.nn.functional.normalize(t.flatten(2), dim=2)
    expected = kernel(pt, pt) + kernel(ps, ps) - 2 * kernel(ps, pt)
    nst = build("nst", one_stage((4, 8, 8)), one_stage((6, 4, 4)))
    assert term(nst, s, t, "nst", batch=3) == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------- KDSVD (hand-made SVD)


def basis(*rows):
    return torch.tensor(rows, dtype=torch.float64).T / torch.tensor([math.sqrt(sum(x * x for x in r)) for r in rows],
                                                                    dtype=torch.float64)


# Right singular vectors of 4×4 matrices X = diag(σ)·Vᵀ, first column the aligned one; every aligned vector has the
# form (a, −a, b, −b), so the loss does not depend on the signs the SVD picks.
TEACHER = [basis((1, -1, 0, 0), (1, 1, 0, 0), (0, 0, 1, -1), (0, 0, 1, 1)),
           basis((1, -1, 1, -1), (1, 1, 1, 1), (1, -1, -1, 1), (1, 1, -1, -1))]
STUDENT = [basis((2, -2, 1, -1), (1, -1, -2, 2), (1, 1, 0, 0), (0, 0, 1, 1)),
           basis((1, -1, 2, -2), (2, -2, -1, 1), (1, 1, 0, 0), (0, 0, 1, 1))]
SIGMA_T, SIGMA_S = (5.0, 3.0, 2.0, 1.0), (1.0, 4.0, 3.0, 2.0)  # distinct; the student's aligned vector not the top


def kdsvd_by_hand():
    """``Σ_{p,q} (R_s − R_t)²`` with ``R[p,q] = exp(−(v_2[p] − v_1[q])²/8)`` and σ̂_t = 1 (k = 1)."""
    vt = [v[:, 0].tolist() for v in TEACHER]
    vs = [v[:, 0].tolist() for v in STUDENT]
    total = 0.0
    for p in range(4):
        for q in range(4):
            r_s = math.exp(-((vs[1][p] - vs[0][q]) ** 2) / 8)
            r_t = math.exp(-((vt[1][p] - vt[0][q]) ** 2) / 8)
            total += (r_s - r_t) ** 2
    return total


def svd_maps(vectors, sigma, layout, batch):
    """Stage maps whose SVD matrix (layout's reshape) is ``diag(σ)·Vᵀ``, repeated over the batch."""
    x = (torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ vectors.T).float()
    f = x.T.reshape(4, 2, 2) if layout == "repdistiller" else x.reshape(2, 2, 4)  # (HW, C) or (C·H, W)
    return f.expand(batch, *f.shape).clone()


@pytest.mark.parametrize("layout", ["repdistiller", "mdistiller"])
def test_kdsvd_matches_hand_computation(layout):
    shape = (4, 2, 2) if layout == "repdistiller" else (2, 2, 4)
    taps = {"stage1": shape, "stage2": shape}
    kdsvd = build("kdsvd", taps, taps, options={"layout": layout})
    expected = kdsvd_by_hand()
    assert expected > 1e-3
    for sign in (1, -1):  # the SVD's sign choices do not matter
        for batch in (1, 2):  # summed over samples, divided by B
            f_s = {f"stage{i + 1}": svd_maps(STUDENT[i], SIGMA_S, layout, batch) for i in range(2)}
            f_t = {f"stage{i + 1}": sign * svd_maps(TEACHER[i], SIGMA_T, layout, batch) for i in range(2)}
            assert kdsvd.losses(step(kdsvd, f_s, f_t, batch))["kdsvd"].item() == pytest.approx(expected, rel=1e-4)


def test_kdsvd_layouts_differ_and_k_is_an_option():
    kdsvd = build("kdsvd", "resnet20", "resnet56")
    md = build("kdsvd", "resnet20", "resnet56", options={"layout": "mdistiller"})
    wide = build("kdsvd", "resnet20", "resnet56", options={"k": "2"})
    f_s, f_t = random_features(kdsvd, 2)
    values = [m.losses(step(m, f_s, f_t, 2))["kdsvd"].item() for m in (kdsvd, md, wide)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert values[0] != pytest.approx(values[1], rel=0.1)
    with pytest.raises(KdbenchError, match="option kdsvd.layout is one of repdistiller, mdistiller"):
        method_class("kdsvd").resolve_options({"layout": "tf"})
    with pytest.raises(KdbenchError, match="kdsvd relates consecutive stages and needs two stage taps"):
        build("kdsvd", one_stage((4, 2, 2)), one_stage((4, 2, 2)))


@pytest.mark.parametrize("layout, message", [
    ("repdistiller", "kdsvd \\(layout=repdistiller\\) needs the student's and the teacher's channels equal at every "
                     "stage; stage1: student 116, teacher 64"),
    ("mdistiller", "kdsvd \\(layout=mdistiller\\) needs the student's and the teacher's widths equal at every "
                   "stage; stage1: student 16, teacher 32")])
def test_kdsvd_refuses_unequal_columns_when_the_sweep_is_planned(layout, message):
    with pytest.raises(KdbenchError, match=message) as error:
        build("kdsvd", "ShuffleV2", "resnet32x4", options={"layout": layout})
    assert "\n" not in str(error.value)
    options = (("kdsvd", "layout", layout),)
    with pytest.raises(KdbenchError, match="kdsvd cannot train the pair resnet32x4:ShuffleV2: " + message):
        tiny_sweep(methods=("kdsvd",), pair=("resnet32x4", "ShuffleV2"), method_options=options).plan()


# ------------------------------------------------------------------------------------------- every method, every pair


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_student_never_the_teacher(method):
    m = build(method, "resnet20", "resnet56", protocol="semckd")
    f_s, f_t = random_features(m, 3, requires_grad=True)
    out = step(m, f_s, f_t, 3)
    terms = m.losses(out)
    assert set(terms) == {"ce", "kd", method}
    terms[method].backward()
    for name, feature in f_s.items():
        assert feature.grad is not None and torch.isfinite(feature.grad).all() and feature.grad.abs().sum() > 0, name
    assert all(f.grad is None for f in f_t.values())
    assert not list(m.parameters())  # no auxiliary module


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pair", [("vgg13", "vgg8"), ("resnet32x4", "resnet8x4")])
def test_no_auxiliary_parameters(method, pair):
    m = build(method, pair[1], pair[0])
    assert m.extra_params_train() == 0 and m.extra_params_inference() == 0


@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("method", METHODS)
def test_builds_and_runs_on_every_reference_pair(method, pair):
    teacher, student = pair
    if method == "kdsvd" and pair in CROSS_CHANNELS:
        with pytest.raises(KdbenchError, match="needs the student's and the teacher's channels equal"):
            build(method, student, teacher)
        return
    m = build(method, student, teacher)
    f_s, f_t = random_features(m, 3)
    f_s = {k: v.relu() for k, v in f_s.items()}  # stage outputs are mostly post-ReLU
    f_t = {k: v.relu() for k, v in f_t.items()}
    terms = m.losses(step(m, f_s, f_t, 3))
    assert set(terms) == {"ce", method}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("method", METHODS)
def test_terms_are_fp32_under_bf16_autocast(method):
    m = build(method, "resnet20", "resnet56")
    f_s, f_t = random_features(m, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = m.losses(step(m, {k: v.bfloat16() for k, v in f_s.items()}, {k: v.bfloat16() for k, v in f_t.items()},
                              2))
    assert terms[method].dtype == torch.float32 and torch.isfinite(terms[method])


@pytest.mark.parametrize("protocol, ce, kd", [("official", 1.0, 0.0), ("crd", 1.0, 0.0), ("semckd", 1.0, 1.0)])
@pytest.mark.parametrize("method", METHODS)
def test_presets_resolve_to_the_reference_weights(method, protocol, ce, kd):
    cls = method_class(method)
    for teacher, student in REFERENCE_PAIRS:
        options = dict(cls.resolve_options({}, protocol, teacher, student))
        assert (options["ce_weight"], options["kd_weight"], options["beta"]) == (ce, kd, BETA[method])
        assert options["temperature"] == 4.0 and options["kl_reduction"] == "batchmean"
    assert cls.family == {"at": "feature", "sp": "relation", "nst": "feature", "kdsvd": "relation"}[method]
    assert cls.label(options) == (f"{method} (+KD)" if kd else method)


def kdsvd_student_gradient(dead_channels: int) -> torch.Tensor:
    """The gradient KDSVD sends into a resnet20-like student's stage maps (28×28 input: 7×7 × 64 at stage 3, so
    H·W < C), with ``dead_channels`` of stage 3 all zero, as ReLU leaves them."""
    torch.manual_seed(0)
    sizes = [(16, 28, 28), (32, 14, 14), (64, 7, 7)]
    f_s = [torch.relu(torch.randn(8, *s)) for s in sizes]
    f_s[2][:, 64 - dead_channels:] = 0
    f_s = [f.requires_grad_() for f in f_s]
    f_t = [torch.relu(torch.randn(8, *s)) for s in sizes]
    kdsvd_loss(list(zip(f_s, f_t)), 1, "repdistiller").backward()
    return torch.cat([f.grad.flatten() for f in f_s])


def test_kdsvd_zeroes_the_gradient_through_repeated_singular_values_and_leaves_it_alone_elsewhere(monkeypatch):
    """Repeated (zero) singular values make the SVD's backward inf/NaN; unchecked, one such batch puts NaN into the
    student's weights (every seed of the reference set's resnet56 -> resnet20 did). kdsvd zeroes those entries."""
    hooked = kdsvd_student_gradient(dead_channels=54), kdsvd_student_gradient(dead_channels=0)
    monkeypatch.setattr(torch.Tensor, "register_hook", lambda self, hook: None)  # the reference: no gradient hook
    plain = kdsvd_student_gradient(dead_channels=54), kdsvd_student_gradient(dead_channels=0)
    assert not torch.isfinite(plain[0]).all()
    assert torch.isfinite(hooked[0]).all() and hooked[0].abs().sum() > 0
    assert torch.isfinite(plain[1]).all() and torch.equal(hooked[1], plain[1])
