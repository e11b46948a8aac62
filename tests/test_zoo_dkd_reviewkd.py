"""DKD (methods/dkd.py) and ReviewKD (methods/reviewkd.py): losses against hand computations and closed forms,
gradients, auxiliary sizes, every reference pair, protocols."""

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import method_context
from test_methods_e2e import REFERENCE_PAIRS

from kdbench.errors import KdbenchError
from kdbench.methods import method_class
from kdbench.methods.base import StepOutputs, kd_divergence
from kdbench.methods.dkd import dkd_divergences, warmup_factor
from kdbench.methods.reviewkd import ABF, hcl_loss
from kdbench.models import create_model
from kdbench.models.taps import feature_shapes

DKD, ReviewKD = method_class("dkd"), method_class("reviewkd")


@functools.cache
def shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return feature_shapes(create_model(arch, num_classes=100), (3, 32, 32))


def build(method, teacher, student, protocol="official", options=None):
    cls = method_class(method)
    resolved = {**dict(cls.resolve_options({}, protocol, teacher, student)), **(options or {})}
    return cls(method_context(method, shapes(student), shapes(teacher), protocol, resolved, batch_size=4))


def step(method, batch=2, epoch=0, seed=0):
    """Random forwards of the method's taps; every tensor requires grad, the teacher's too, to show none reaches it."""
    g = torch.Generator().manual_seed(seed)

    def taps(tap_shapes, names):
        return {n: torch.randn(batch, *tap_shapes[n], generator=g).requires_grad_() for n in names}

    return StepOutputs(labels=torch.randint(0, 100, (batch,), generator=g),
                       student_logits=torch.randn(batch, 100, generator=g).requires_grad_(),
                       student_features=taps(method.ctx.student_shapes, method.student_taps),
                       teacher_logits=torch.randn(batch, 100, generator=g).requires_grad_(),
                       teacher_features=taps(method.ctx.teacher_shapes, method.teacher_taps), epoch=epoch)


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_warmup_is_mdistillers_with_one_indexed_epochs():
    assert [warmup_factor(e, 20) for e in (0, 9, 18, 19, 100)] == [1 / 20, 10 / 20, 19 / 20, 1.0, 1.0]
    assert warmup_factor(0, 1) == 1.0  # warmup_epochs = 1: no warm-up


# ------------------------------------------------------------------------------------------------------------ DKD


ZS = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 2.0], [4.0, 0.0, 1.0, 1.0]])
ZT = torch.tensor([[2.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, -2.0], [8.0, -3.0, 0.0, 2.0]])
Y = torch.tensor([1, 2, 0])


def test_dkd_divergences_match_hand_computation():
    t = 4.0
    tckd = nckd = 0.0
    for zs, zt, y in zip(ZS.tolist(), ZT.tolist(), Y.tolist()):
        ps, pt = softmax(zs, t), softmax(zt, t)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others = [j for j in range(len(zs)) if j != y]
        nckd += kl([pt[j] / (1 - pt[y]) for j in others], [ps[j] / (1 - ps[y]) for j in others])
    got_t, got_n = dkd_divergences(ZS, ZT, Y, t)
    assert got_t.item() == pytest.approx(t * t * tckd / 3, rel=1e-5)
    assert got_n.item() == pytest.approx(t * t * nckd / 3, rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dkd_decomposes_classical_kd(t):
    # Zhao et al. 2022, Eq. 3/4: KD = TCKD + (1 − p_t)·NCKD per sample, p_t the teacher's target probability
    for i in range(len(Y)):
        tckd, nckd = dkd_divergences(ZS[i:i + 1], ZT[i:i + 1], Y[i:i + 1], t)
        p_target = torch.softmax(ZT[i] / t, 0)[Y[i]]
        assert kd_divergence(ZS[i:i + 1], ZT[i:i + 1], t).item() == pytest.approx(
            (tckd + (1 - p_target) * nckd).item(), rel=1e-5)


def test_dkd_losses_weight_warm_up_and_drop_zero_terms():
    method = build("dkd", "resnet32x4", "resnet8x4")
    out = step(method)
    tckd, nckd = dkd_divergences(out.student_logits, out.teacher_logits, out.labels, 4.0)
    for epoch, factor in ((0, 1 / 20), (4, 5 / 20), (19, 1.0), (200, 1.0)):
        terms = method.losses(dataclasses.replace(out, epoch=epoch))
        assert set(terms) == {"ce", "tckd", "nckd"}  # no logit KD besides DKD itself
        assert terms["ce"].item() == pytest.approx(F.cross_entropy(out.student_logits, out.labels).item())
        assert terms["tckd"].item() == pytest.approx(factor * tckd.item(), rel=1e-6)
        assert terms["nckd"].item() == pytest.approx(factor * 8.0 * nckd.item(), rel=1e-6)
    no_tckd = build("dkd", "resnet32x4", "resnet8x4", options={"alpha": 0.0, "warmup_epochs": 1})
    assert set(no_tckd.losses(out)) == {"ce", "nckd"}


def test_dkd_is_fp32_and_finite_where_a_student_probability_underflows():
    zs = torch.tensor([[-200.0, 200.0, 0.0]], dtype=torch.bfloat16)  # p_s(target 0) = e^-100 at T 4: 0 in fp32
    zt = torch.tensor([[5.0, 0.0, 1.0]], dtype=torch.bfloat16)
    tckd, nckd = dkd_divergences(zs, zt, torch.tensor([0]), 4.0)
    assert tckd.dtype == nckd.dtype == torch.float32
    assert math.isfinite(tckd.item()) and math.isfinite(nckd.item()) and tckd.item() > 100


def test_dkd_gradients_reach_the_student_logits_never_the_teacher():
    method = build("dkd", "vgg13", "vgg8")
    out = step(method, batch=4)
    sum(method.losses(out).values()).backward()
    assert out.student_logits.grad.abs().sum() > 0 and out.teacher_logits.grad is None


@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_dkd_runs_on_every_reference_pair_without_aux_modules(pair):
    method = build("dkd", *pair)
    assert method.student_taps == method.teacher_taps == () and method.extra_params_train() == 0
    assert all(torch.isfinite(v) for v in method.losses(step(method, batch=3)).values())


BETAS = {("vgg13", "vgg8"): 6.0, ("resnet32x4", "resnet8x4"): 8.0, ("wrn_40_2", "wrn_16_2"): 6.0,
         ("resnet56", "resnet20"): 2.0, ("resnet32x4", "ShuffleV2"): 8.0, ("ResNet50", "MobileNetV2"): 8.0,
         ("resnet110", "resnet20"): 2.0, ("ResNet50", "vgg8"): 8.0, ("vgg13", "MobileNetV2"): 6.0}


@pytest.mark.parametrize("protocol", ["official", "crd", "semckd"])
def test_dkd_presets_are_its_own_objective_under_every_protocol(protocol):
    for (teacher, student), beta in BETAS.items():
        options = dict(DKD.resolve_options({}, protocol, teacher, student))
        assert options == {"ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0, "kl_reduction": "batchmean",
                           "alpha": 1.0, "beta": beta, "warmup_epochs": 20}
        assert DKD.label(options) == "dkd"
    assert dict(DKD.resolve_options({"beta": "3"}, protocol, "vgg13", "vgg8"))["beta"] == 3.0  # --set wins
    with pytest.raises(KdbenchError, match="warmup_epochs"):
        DKD.resolve_options({"warmup_epochs": 0}, protocol)


# ------------------------------------------------------------------------------------------------------- ReviewKD


def block_mean(x, size):
    """Average pooling of an (N, C, H, H) map to size × size by reshaping, H divisible by size."""
    n, c, h, _ = x.shape
    return x.reshape(n, c, size, h // size, size, h // size).mean(dim=(3, 5))


def test_hcl_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    maps = [(torch.randn(2, 3, h, h, generator=g), torch.randn(2, 3, h, h, generator=g)) for h in (8, 4, 2, 1)]
    expected = 0.0
    for (fs, ft), pools in zip(maps, ([(4, 1 / 2), (2, 1 / 4), (1, 1 / 8)], [(2, 1 / 2), (1, 1 / 4)], [(1, 1 / 2)],
                                      [])):
        level = ((fs - ft) ** 2).mean().item()
        level += sum(w * ((block_mean(fs, s) - block_mean(ft, s)) ** 2).mean().item() for s, w in pools)
        expected += level / (1 + sum(w for _, w in pools))
    student, teacher = zip(*maps)
    assert hcl_loss(list(student), list(teacher)).item() == pytest.approx(expected, rel=1e-6)
    assert hcl_loss([m.bfloat16() for m in student], list(teacher)).dtype == torch.float32


def test_abf_fuses_with_attention_and_nearest_resizes():
    # identity 1×1 and centre-tap 3×3 convolutions, eval BN (x / sqrt(1 + eps)), constant attention σ(a), σ(b)
    abf = ABF(2, 2, 2, fuse=True).eval()
    with torch.no_grad():
        abf.conv1[0].weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        abf.conv2[0].weight.zero_()
        abf.conv2[0].weight[:, :, 1, 1] = torch.eye(2)
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.copy_(torch.tensor([0.5, -1.0]))
    bn = 1 / math.sqrt(1 + 1e-5)
    a, b = torch.sigmoid(torch.tensor(0.5)), torch.sigmoid(torch.tensor(-1.0))
    x, residual = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 1, 1)
    output, passed = abf(x, residual, (4, 4))
    fused = a * bn * x + b * residual.expand(1, 2, 2, 2)  # the residual upsampled to the student's 2×2
    up = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # then to the teacher's 4×4
    assert torch.allclose(passed, up, atol=1e-6) and torch.allclose(output, bn * up, atol=1e-6)


def test_reviewkd_reviews_deep_to_shallow():
    # each fused level sees its own and every deeper student level, never a shallower one
    method = build("reviewkd", "resnet32x4", "resnet8x4").eval()
    out = step(method)
    base = method.review(out.student_features)
    for changed, level in (("stage1", 0), ("pooled", 3)):
        features = {**out.student_features, changed: out.student_features[changed] + 1}
        moved = [not torch.allclose(a, b) for a, b in zip(base, method.review(features))]
        assert moved == [i <= level for i in range(4)], changed
    assert [tuple(o.shape[1:]) for o in base] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)]


def test_reviewkd_taps_and_loss_weights():
    method = build("reviewkd", "resnet32x4", "resnet8x4")
    assert method.student_taps == ("stage1", "stage2", "stage3", "pooled")
    assert method.teacher_taps == ("stage1_preact", "stage2_preact", "stage3_preact", "pooled")
    method.eval()  # batch statistics aside, the review is the same at every epoch
    out = step(method)
    teacher = [out.teacher_features[n].reshape(2, -1, *shapes("resnet32x4")[n][1:] or (1, 1))
               for n in method.teacher_taps]
    hcl = hcl_loss(method.review(out.student_features), teacher).item()
    for epoch, factor in ((0, 1 / 20), (9, 10 / 20), (25, 1.0)):
        terms = method.losses(dataclasses.replace(out, epoch=epoch))
        assert set(terms) == {"ce", "review"}
        assert terms["review"].item() == pytest.approx(5.0 * factor * hcl, rel=1e-5)


def test_reviewkd_gradients_reach_student_and_every_module_never_the_teacher():
    method = build("reviewkd", "vgg13", "vgg8", protocol="semckd")
    out = step(method, batch=3, epoch=30)
    terms = method.losses(out)
    assert set(terms) == {"ce", "kd", "review"}
    terms["review"].backward()
    for name in method.student_taps:
        assert out.student_features[name].grad.abs().sum() > 0, name
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(t.grad is None for t in out.teacher_features.values())
    assert sum(p.numel() for n, p in method.named_parameters() if "att_conv" in n) == 4 * (2 * 2 * 512 + 2)


@pytest.mark.parametrize("pair, params", [(("resnet32x4", "resnet8x4"), 1_808_774), (("vgg13", "vgg8"), 9_847_560)])
def test_reviewkd_aux_parameters_match_the_official_modules(pair, params):
    assert build("reviewkd", *pair).extra_params_train() == params
    assert build("reviewkd", *pair).extra_params_inference() == 0


@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_reviewkd_runs_on_every_reference_pair(pair):
    teacher, student = pair
    method = build("reviewkd", teacher, student)
    out = step(method)
    for fused, name in zip(method.review(out.student_features), method.teacher_taps):
        assert tuple(fused.shape[1:]) == (shapes(teacher)[name] + (1, 1))[:3]  # the teacher map, pooled as C×1×1
    assert all(torch.isfinite(v) for v in method.losses(out).values())


def test_reviewkd_refuses_pairs_with_different_stage_counts():
    with pytest.raises(KdbenchError, match="student has 3 stages, the teacher 4"):
        build("reviewkd", "vgg13", "resnet8x4")


PAIR_WEIGHTS = {("resnet32x4", "resnet8x4"): 5.0, ("resnet32x4", "ShuffleV2"): 8.0, ("wrn_40_2", "wrn_16_2"): 5.0,
                ("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1.0, ("vgg13", "vgg8"): 1.0,
                ("ResNet50", "MobileNetV2"): 1.0}


@pytest.mark.parametrize("protocol, ce, kd", [("official", 1.0, 0.0), ("crd", 1.0, 0.0), ("semckd", 1.0, 1.0)])
def test_reviewkd_presets(protocol, ce, kd):
    for (teacher, student), beta in PAIR_WEIGHTS.items():
        options = dict(ReviewKD.resolve_options({}, protocol, teacher, student))
        assert options == {"ce_weight": ce, "kd_weight": kd, "temperature": 4.0, "kl_reduction": "batchmean",
                           "beta": beta, "warmup_epochs": 20}
        assert ReviewKD.label(options) == ("reviewkd (+KD)" if kd else "reviewkd")
