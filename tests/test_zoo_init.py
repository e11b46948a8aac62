"""AB, FT and FSP (methods/ab.py, ft.py, fsp.py), the methods with an init stage: AB's margin loss, FSP's flow
matrices and FT's factor loss against hand computations, gradient flow in both stages, parameter counts, every
reference pair, presets, what each init stage trains, and runs through the harness (what changes in which stage,
and a run interrupted inside the init stage that resumes to the uninterrupted history)."""

import dataclasses
import functools
import math

import pytest
import torch
from conftest import method_context, run_interrupted, tiny_sweep
from torch import nn

from kdbench import harness
from kdbench.errors import KdbenchError
from kdbench.harness import RunEnv, run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import StepOutputs, kd_divergence
from kdbench.models import create_model, model_entry
from kdbench.models.taps import feature_shapes
from kdbench.results import ResultsStore
from kdbench.spec import Recipe

METHODS = ("ab", "ft", "fsp")
REFERENCE_PAIRS = [("vgg13", "vgg8"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
                   ("resnet56", "resnet20"), ("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2")]
INIT_TERM = {"ab": {"ab"}, "ft": {"paraphraser"}, "fsp": {"fsp"}}  # the init stage's loss terms
MAIN_TERM = {"ab": set(), "ft": {"ft"}, "fsp": set()}  # the main stage's terms beside the logit terms


@functools.lru_cache(maxsize=None)
def shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return feature_shapes(create_model(arch, num_classes=100), (3, 32, 32))


def build(method, student, teacher, protocol="crd", options=None):
    """``student``/``teacher``: zoo names or shape dicts."""
    s = shapes(student) if isinstance(student, str) else student
    t = shapes(teacher) if isinstance(teacher, str) else teacher
    name = {"student": student} if isinstance(student, str) else {}
    return method_class(method)(method_context(method, s, t, protocol, options, batch_size=4, **name))


def step(m, stage="main", batch=2, requires_grad=False, features=None, seed=0):
    """``m``'s taps in ``stage``: ``features`` (student's, teacher's) or random ones of ``batch`` samples."""
    g = torch.Generator().manual_seed(seed)
    if features is None:
        features = tuple({n: torch.randn(batch, *shapes_[n], generator=g).requires_grad_(requires_grad) for n in taps}
                         for taps, shapes_ in ((m.student_taps, m.ctx.student_shapes),
                                               (m.teacher_taps, m.ctx.teacher_shapes)))
    f_s, f_t = features
    n = next(iter(f_s.values())).shape[0]
    return StepOutputs(torch.zeros(n, dtype=torch.long), torch.randn(n, 100, generator=g), f_s,
                       torch.randn(n, 100, generator=g), f_t, stage=stage)


def maps(*shapes_):
    """Shape dicts of made-up models: stage k (C, H, W) and its preact tap."""
    return {**{f"stage{k}": s for k, s in enumerate(shapes_, 1)},
            **{f"stage{k}_preact": s for k, s in enumerate(shapes_, 1)}}


# ------------------------------------------------------------------------------------------------ hand computations
def test_ab_margin_loss_matches_the_hand_computation():
    ab = build("ab", maps((1, 1, 2), (1, 1, 1)), maps((1, 1, 2), (1, 1, 1)))
    assert all(isinstance(c, nn.Identity) for c in ab.connectors)
    s1 = torch.tensor([[-2.0, -0.5], [0.5, 2.0]]).reshape(2, 1, 1, 2)
    t1 = torch.tensor([[-1.0, 1.0], [0.0, 3.0]]).reshape(2, 1, 1, 2)
    s2, t2 = torch.tensor([0.0, -3.0]).reshape(2, 1, 1, 1), torch.tensor([-2.0, 5.0]).reshape(2, 1, 1, 1)
    # stage 1, m = 1: (−2 | t ≤ 0) beyond the margin: 0; (−0.5 | t > 0): (−0.5 − 1)² = 2.25; (0.5 | t = 0 ≤ 0):
    # (0.5 + 1)² = 2.25; (2 | t > 0) beyond: 0 → 4.5. Stage 2: (0 | t ≤ 0): 1; (−3 | t > 0): 16 → 17.
    # Weights 2^{i−K+1} = 0.5, 1; times 3 / (1000·B), B = 2.
    features = ({"stage1_preact": s1, "stage2_preact": s2}, {"stage1_preact": t1, "stage2_preact": t2})
    terms = ab.losses(step(ab, "init", features=features))
    assert set(terms) == {"ab"} and terms["ab"].item() == pytest.approx((0.5 * 4.5 + 17) * 3 / 2000)
    wide = build("ab", maps((1, 1, 2), (1, 1, 1)), maps((1, 1, 2), (1, 1, 1)), options={"margin": 2.0})
    # m = 2, stage 2: (0 + 2)² = 4 and (−3 − 2)² = 25; stage 1: 0 (t ≤ 0, −2 not > −2), (−2.5)², (2.5)², 0
    assert wide.losses(step(wide, "init", features=features))["ab"].item() == pytest.approx(
        (0.5 * 12.5 + 29) * 3 / 2000)


@pytest.mark.parametrize("protocol, terms", [("crd", {"ce"}), ("official", {"ce"}), ("semckd", {"ce", "kd"})])
@pytest.mark.parametrize("method", ("ab", "fsp"))
def test_ab_and_fsp_main_stage_is_the_logit_terms_alone(method, protocol, terms):
    m = build(method, "resnet8x4", "resnet32x4", protocol)
    out = step(m, "main")
    got = m.losses(out)
    assert set(got) == terms and got["ce"].item() == pytest.approx(m.cross_entropy(out).item())
    if "kd" in terms:
        assert got["kd"].item() == pytest.approx(kd_divergence(out.student_logits, out.teacher_logits).item())


def test_ab_connectors_are_conv_and_bn_without_relu_where_shapes_differ():
    ab = build("ab", "ShuffleV2", "resnet32x4")  # 116×16² → 64×32² etc.: transposed convs
    assert [type(c.conv).__name__ for c in ab.connectors] == ["ConvTranspose2d"] * 3
    x = torch.randn(2, 116, 16, 16)
    out = ab.connectors[0](x)
    assert out.shape == (2, 64, 32, 32) and (out < 0).any()
    torch.testing.assert_close(out, ab.connectors[0].bn(ab.connectors[0].conv(x)))
    same_channels = build("ab", maps((4, 4, 4)), maps((4, 2, 2)))  # the height differs: a stride-2 conv
    assert type(same_channels.connectors[0].conv).__name__ == "Conv2d"


def flow_by_hand(bottom: list[list[float]], top: list[list[float]]) -> list[list[float]]:
    """G[j][k] = mean over positions of top[j][x]·bottom[k][x], for one sample: lists of channels of positions."""
    return [[sum(a * b for a, b in zip(t, s)) / len(t) for s in bottom] for t in top]


def test_fsp_flow_matrices_match_the_hand_computation():
    from kdbench.methods.fsp import flow_matrices

    stem = [[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]]  # 2 channels on 2×2
    stage1 = [[2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, -1.0, 0.0, 2.0]]  # 3 channels on 2×2
    stage2 = [[4.0], [-2.0]]  # 2 channels on 1×1: stage1 is pooled to the channel means (1, 1, 1)
    g = [torch.tensor(c).reshape(1, len(c), 2, -1) for c in (stem, stage1)] + [torch.tensor(stage2).reshape(1, 2, 1, 1)]
    first, second = flow_matrices(g)
    assert first.shape == (1, 3, 2) and second.shape == (1, 2, 3)
    torch.testing.assert_close(first[0], torch.tensor(flow_by_hand(stem, stage1)))
    # G[0, 0] = (1·2 + 2·0 + 3·1 + 4·1) / 4 = 9/4
    assert first[0, 0, 0].item() == pytest.approx(9 / 4)
    torch.testing.assert_close(second[0], torch.tensor([[4.0, 4.0, 4.0], [-2.0, -2.0, -2.0]]))


def test_fsp_equals_repdistillers_broadcast_form():
    """RepDistiller's ``(bot.unsqueeze(1) * top.unsqueeze(2)).mean(-1)``, here with ``bmm``."""
    from kdbench.methods.fsp import flow_matrices

    torch.manual_seed(0)
    bottom, top = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)
    pooled = torch.nn.functional.adaptive_avg_pool2d(bottom, (4, 4))
    reference = (pooled.flatten(2).unsqueeze(1) * top.flatten(2).unsqueeze(2)).mean(-1)
    torch.testing.assert_close(flow_matrices([bottom, top])[0], reference)


def test_fsp_loss_is_the_sum_over_pairs_of_mean_squared_differences():
    shape = {"stem": (2, 2, 2), "stage1": (3, 2, 2), "stage2": (2, 1, 1)}
    fsp = build("fsp", shape, shape)
    torch.manual_seed(0)
    f_s = {k: torch.randn(2, *v) for k, v in shape.items()}
    f_t = {k: torch.randn(2, *v) for k, v in shape.items()}

    def channels(f, i, tap, size):  # sample i's channels as lists of positions, pooled to ``size``
        x = torch.nn.functional.adaptive_avg_pool2d(f[tap][i], size)
        return x.reshape(x.shape[0], -1).tolist()

    expected = 0.0
    for a, b in (("stem", "stage1"), ("stage1", "stage2")):
        size = shape[b][1:]  # the deeper map is never the larger here
        cells = []
        for i in range(2):
            g_s = flow_by_hand(channels(f_s, i, a, size), channels(f_s, i, b, size))
            g_t = flow_by_hand(channels(f_t, i, a, size), channels(f_t, i, b, size))
            cells += [(x - y) ** 2 for row_s, row_t in zip(g_s, g_t) for x, y in zip(row_s, row_t)]
        expected += sum(cells) / len(cells)
    terms = fsp.losses(step(fsp, "init", features=(f_s, f_t)))
    assert set(terms) == {"fsp"} and terms["fsp"].item() == pytest.approx(expected, rel=1e-5)


def test_ft_factor_loss_matches_the_hand_computation():
    from kdbench.methods.ft import factor_loss

    # equal sizes: a(φ_s) = normalize(mean_c φ²) = normalize(1, 2), a(φ_t) = normalize(0, 9) = (0, 1)
    phi_s = torch.tensor([[1.0, 0.0], [1.0, 2.0]]).reshape(1, 2, 1, 2)
    phi_t = torch.tensor([[0.0, 3.0]]).reshape(1, 1, 1, 2)
    r5 = math.sqrt(5)
    assert factor_loss(phi_s, phi_t).item() == pytest.approx((1 / r5 + abs(2 / r5 - 1)) / 2)
    # the larger map (2×4) is average-pooled to the smaller (1×2): blocks (1, 3, 1, 3) → 2 and (0, 0, 2, 2) → 1
    big = torch.tensor([[1.0, 3.0, 0.0, 0.0], [1.0, 3.0, 2.0, 2.0]]).reshape(1, 1, 2, 4)
    small = torch.ones(1, 1, 1, 2)
    r17, r2 = math.sqrt(17), math.sqrt(2)
    expected = (abs(4 / r17 - 1 / r2) + abs(1 / r17 - 1 / r2)) / 2
    assert factor_loss(big, small).item() == pytest.approx(expected)
    assert factor_loss(small, big).item() == pytest.approx(expected)


def test_ft_losses_are_the_reconstruction_then_the_weighted_factor_distance():
    from kdbench.methods.ft import factor_loss

    ft = build("ft", "resnet8x4", "resnet32x4")
    out = step(ft, "init")
    f_t = out.teacher_features["stage3"]
    init = ft.losses(out)
    reconstruction = ft.paraphraser.decoder(ft.paraphraser.encoder(f_t))
    assert set(init) == {"paraphraser"}
    assert init["paraphraser"].item() == pytest.approx(((reconstruction - f_t) ** 2).mean().item(), rel=1e-6)
    main = ft.losses(dataclasses.replace(out, stage="main"))
    expected = 200 * factor_loss(ft.translator(out.student_features["stage3"]), ft.paraphraser.encoder(f_t))
    assert set(main) == {"ce", "ft"} and main["ft"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_losses_are_fp32_under_autocast():
    for method, student, teacher, stage in (("ab", "ShuffleV2", "resnet32x4", "init"),
                                            ("fsp", "resnet8x4", "resnet32x4", "init"),
                                            ("ft", "resnet8x4", "resnet32x4", "main"),
                                            ("ft", "resnet8x4", "resnet32x4", "init")):
        m = build(method, student, teacher)
        out = step(m, stage)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = m.losses(out)
        assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values()), (method, stage)


# ------------------------------------------------------------------------------------------------- gradient flow
def grads_of(module: nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and p.grad.abs().sum().item() > 0 for n, p in module.named_parameters()}


@pytest.mark.parametrize("method, student, teacher", [("ab", "ShuffleV2", "resnet32x4"),
                                                      ("fsp", "resnet8x4", "resnet32x4")])
def test_ab_and_fsp_init_gradients_reach_the_student_and_connectors_never_the_teacher(method, student, teacher):
    m = build(method, student, teacher)
    out = step(m, "init", requires_grad=True)
    sum(m.losses(out).values()).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in out.student_features.values())
    assert all(f.grad is None for f in out.teacher_features.values())
    assert all(grads_of(m).values()) and len(grads_of(m)) == (12 if method == "ab" else 0)  # AB: 3 × (conv, BN)


def test_ft_gradients_reach_the_paraphraser_in_init_and_the_student_and_translator_in_main():
    ft = build("ft", "resnet8x4", "resnet32x4")
    out = step(ft, "init", requires_grad=True)
    sum(ft.losses(out).values()).backward()
    assert all(grads_of(ft.paraphraser).values()) and not any(grads_of(ft.translator).values())
    assert out.student_features["stage3"].grad is None and out.teacher_features["stage3"].grad is None
    ft.zero_grad(set_to_none=True)
    out = step(ft, "main", requires_grad=True)
    ft.losses(out)["ft"].backward()
    assert all(grads_of(ft.translator).values()) and not any(grads_of(ft.paraphraser).values())
    assert out.student_features["stage3"].grad.abs().sum() > 0 and out.teacher_features["stage3"].grad is None


# ------------------------------------------------------------------------------------------ aux parameter counts
# methods-zoo.md §1, §8, §9 [computed], 100 classes: (teacher, student) -> (trained with the student, frozen)
AUX_PARAMS = {
    "ab": {("vgg13", "vgg8"): (0, 0), ("resnet32x4", "resnet8x4"): (0, 0),
           ("resnet32x4", "ShuffleV1"): (5_162_304, 0), ("ResNet50", "MobileNetV2"): (6_221_056, 0)},
    "ft": {("vgg13", "vgg8"): (4_131_840, 8_259_840), ("resnet32x4", "resnet8x4"): (1_033_728, 2_065_536),
           ("ResNet50", "MobileNetV2"): (None, 132_129_792)},
    "fsp": {("vgg13", "vgg8"): (0, 0), ("resnet32x4", "resnet8x4"): (0, 0)},
}


@pytest.mark.parametrize("method", METHODS)
def test_aux_parameter_counts_match_the_spec(method):
    for (teacher, student), (trained, frozen) in AUX_PARAMS[method].items():
        with torch.device("meta"):
            m = build(method, student, teacher)
        if trained is not None:
            assert m.extra_params_train() == trained, (teacher, student)
        assert m.fit_metrics().get("frozen_aux_params", 0) == frozen and m.extra_params_inference() == 0


# ------------------------------------------------------------------------------------------------ reference pairs
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_builds_and_runs_on_every_reference_pair(method, pair):
    teacher, student = pair
    if method == "fsp" and pair in (("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2")):
        with pytest.raises(KdbenchError, match=r"^fsp needs the same channels at the stem and every stage") as err:
            with torch.device("meta"):
                build(method, student, teacher)
        assert "\n" not in str(err.value)
        return
    with torch.device("meta"):  # as the sweep's plan builds it
        build(method, student, teacher)
    m = build(method, student, teacher, protocol="semckd")
    for stage in ("init", "main"):
        terms = m.losses(step(m, stage, batch=3))
        assert all(t.dim() == 0 and t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
        assert set(terms) == (INIT_TERM[method] if stage == "init" else {"ce", "kd"} | MAIN_TERM[method])


def test_ab_pairs_the_first_stages_of_models_with_different_depths():
    ab = build("ab", "resnet8x4", "vgg13")  # 3 stages against 4
    assert ab.student_taps == ab.teacher_taps == ("stage1_preact", "stage2_preact", "stage3_preact")
    assert ab.losses(step(ab, "init"))["ab"].item() > 0


# ------------------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("protocol, ce, kd", [("official", 1.0, 0.0), ("crd", 1.0, 0.0), ("semckd", 1.0, 1.0)])
def test_presets_resolve_to_the_spec_weights(method, protocol, ce, kd):
    cls = method_class(method)
    assert cls.family == {"ab": "feature", "ft": "feature", "fsp": "relation"}[method]
    own = {"ab": {"init_epochs": 30, "margin": 1.0}, "ft": {"init_epochs": 30, "beta": 200.0},
           "fsp": {"init_epochs": 30}}[method]
    for teacher, student in REFERENCE_PAIRS:
        options = dict(cls.resolve_options({}, protocol, teacher, student))
        assert options == {"ce_weight": ce, "kd_weight": kd, "temperature": 4.0, "kl_reduction": "batchmean", **own}
    assert dict(cls.resolve_options({"init_epochs": "2"}))["init_epochs"] == 2
    with pytest.raises(KdbenchError, match="init_epochs must be an integer >= 0"):
        cls.resolve_options({"init_epochs": -1})


@pytest.mark.parametrize("method, option, official", [("ab", "init_epochs", 30), ("fsp", "init_epochs", 30),
                                                       ("dkd", "warmup_epochs", 20),
                                                       ("reviewkd", "warmup_epochs", 20)])
def test_options_counted_in_epochs_scale_with_the_recipe(method, option, official):
    """Official at 240 epochs, in proportion otherwise (at least 1); the user's --set wins, and 0 stays off."""
    cls = method_class(method)

    def resolved(epochs, overrides=None):
        return dict(cls.resolve_options(overrides or {}, "crd", "resnet56", "resnet20", epochs))[option]

    assert resolved(240) == official and resolved(120) == official // 2 and resolved(24) == official // 10
    assert resolved(6) == max(1, round(official * 6 / 240)) and resolved(1) == 1
    assert resolved(6, {option: "7"}) == 7
    if option == "init_epochs":  # 0 turns the stage off, whatever the recipe
        assert resolved(6, {option: 0}) == 0


def test_a_sweep_resolves_epoch_options_with_its_recipe():
    sweep = tiny_sweep(methods=("dkd",), pair=("resnet56", "resnet20"), recipe=dataclasses.replace(MICRO, epochs=6))
    (run,) = [r for r in sweep.plan() if r.method == "dkd"]
    assert dict(run.method_options)["warmup_epochs"] == 1


def test_fts_init_stage_keeps_its_30_epochs_under_every_recipe():
    """It fits the teacher's paraphraser only: a fit, not a share of the student's schedule."""
    assert "init_epochs" not in method_class("ft").epoch_options
    for epochs in (1, 6, 240):
        assert dict(method_class("ft").resolve_options({}, "crd", epochs=epochs))["init_epochs"] == 30


@pytest.mark.parametrize("protocol, main", [("crd", ()), ("official", ()), ("semckd", (0,))])
@pytest.mark.parametrize("method", ("ab", "fsp"))
def test_ab_and_fsp_forward_the_teacher_in_the_main_stage_only_for_kd(method, protocol, main):
    m = build(method, "resnet20", "resnet56", protocol)
    assert m.trainers_for_step(-3, 0) == m.trainers_for_step(-1, 5) == (0,)
    assert m.trainers_for_step(0, 0) == m.trainers_for_step(4, 2) == main


# ------------------------------------------------------------------------------------------- what init stages train
def ids(parameters) -> set[int]:
    return {id(p) for p in parameters}


@pytest.mark.parametrize("method, student, teacher", [("ab", "ShuffleV2", "resnet32x4"),
                                                      ("fsp", "resnet8x4", "resnet32x4")])
def test_ab_and_fsp_init_stages_train_the_student_features_at_its_base_lr(method, student, teacher):
    m = build(method, student, teacher, options={"init_epochs": 7})
    model = create_model(student, num_classes=100)
    stage = m.init_stage(model, 0.123)
    features = ids(model.parameters()) - ids(p for name in LEFT_OUT[student] for p in getattr(model, name).parameters())
    assert (stage.epochs, stage.lr) == (7, 0.123)
    assert ids(stage.parameters) == features | ids(m.parameters()) and len(stage.parameters) == len(set(
        ids(stage.parameters)))
    assert stage.frozen_after == ((m.connectors,) if method == "ab" else ())
    assert ids(stage.student_train_modules) == ids(module for name, module in model.named_children()
                                                   if name not in LEFT_OUT[student] and not name.startswith("tap_")
                                                   and name != "avgpool")


# What RepDistiller's get_feat_modules() leaves out of each architecture (models/*.py): the head, and the last block.
LEFT_OUT = {"ShuffleV2": ("linear", "conv2", "bn2"), "resnet8x4": ("fc",), "wrn_16_2": ("fc", "bn1"),
            "MobileNetV2": ("classifier", "conv2"), "vgg8": ("classifier",), "ResNet50": ("linear",),
            "ShuffleV1": ("linear",)}


@pytest.mark.parametrize("student", sorted(LEFT_OUT))
def test_init_stage_modules_are_repdistillers_get_feat_modules(student):
    """AB's init stage on every architecture family trains what get_feat_modules returns, and nothing it omits."""
    model = create_model(student, num_classes=100)
    stage = build("ab", student, "resnet32x4" if student != "ResNet50" else "ResNet50",
                  options={"init_epochs": 1}).init_stage(model, 0.05)
    trained = ids(stage.parameters)
    for name in LEFT_OUT[student]:
        assert not ids(getattr(model, name).parameters()) & trained, name
    assert all(id(p) in trained for m in stage.student_train_modules for p in m.parameters())


@pytest.mark.parametrize("student, lr", [("resnet8x4", 0.01), ("resnet20", 0.01), ("wrn_16_2", 0.01),
                                         ("vgg8", 0.05), ("ShuffleV2", 0.01), ("MobileNetV2", 0.01)])
def test_ft_init_stage_trains_the_paraphraser_alone_at_repdistillers_lr(student, lr):
    """0.01 for a CIFAR ResNet or WRN student (RepDistiller's list), else the student's base lr."""
    ft = build("ft", student, "resnet32x4")
    stage = ft.init_stage(create_model(student, num_classes=100), model_entry(student).base_lr)
    assert stage.lr == lr and stage.epochs == 30
    assert ids(stage.parameters) == ids(ft.paraphraser.parameters()) and stage.frozen_after == (ft.paraphraser,)


# ------------------------------------------------------------------------------------------------ through the harness
# Three steps of batch 16 per epoch; two init epochs, then one main epoch.
MICRO = Recipe("micro", epochs=1, batch_size=16, train_subset=48, test_subset=32, warmup_steps=0)
INIT2 = tuple((m, "init_epochs", "2") for m in METHODS)


def snapshot(module: nn.Module, buffers: bool = False) -> dict[str, torch.Tensor]:
    """The module's parameters, and with ``buffers`` its BN running statistics and counters too."""
    items = module.state_dict().items() if buffers else module.named_parameters()
    return {n: p.detach().clone() for n, p in items}


def run_recording(specs, env, monkeypatch):
    """Runs ``specs``; returns per student run the parameters of the student and the method at the start and after
    every epoch (snapshots[run_id] = [(student, method), ...])."""
    snapshots, assemble, evaluate = {}, harness._assemble, harness.evaluate
    current = {}

    def recording_assemble(spec, *args, **kwargs):
        parts = assemble(spec, *args, **kwargs)
        current.update(parts=parts, run=spec.run_id)
        snapshots[spec.run_id] = [(snapshot(parts.student, buffers=True), snapshot(parts.method))]
        return parts

    def recording_evaluate(model, *args, **kwargs):
        parts = current["parts"]
        if model is parts.student:
            snapshots[current["run"]].append((snapshot(parts.student, buffers=True), snapshot(parts.method)))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(harness, "_assemble", recording_assemble)
    monkeypatch.setattr(harness, "evaluate", recording_evaluate)
    records = run_sweep(specs, env)
    monkeypatch.undo()
    return records, snapshots


@pytest.fixture(scope="module")
def harness_runs(tmp_path_factory):
    """ab and ft on wrn_16_2 → resnet8 (AB has 1×1 conv connectors), fsp on resnet14 → resnet8."""
    store = ResultsStore(tmp_path_factory.mktemp("init") / "results")
    env = RunEnv(store, progress=False)
    with pytest.MonkeyPatch.context() as monkeypatch:
        first, snaps = run_recording(tiny_sweep(methods=("ab", "ft"), pair=("wrn_16_2", "resnet8"), recipe=MICRO,
                                                method_options=INIT2[:2]).plan(), env, monkeypatch)
        second, more = run_recording(tiny_sweep(methods=("fsp",), pair=("resnet14", "resnet8"), recipe=MICRO,
                                                method_options=INIT2[2:]).plan(), env, monkeypatch)
    records = {r.spec.method: r for r in (*first[1:], *second[1:])}
    return records, {**snaps, **more}, first[0]


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    return {n for n in before if n.startswith(prefix) and not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("method", METHODS)
def test_runs_have_two_init_epochs_then_the_main_one(harness_runs, method):
    records, _, _ = harness_runs
    record = records[method]
    assert record.status == "finished", record.error
    assert [e["epoch"] for e in record.epochs] == [-1, 0, 1]
    assert record.metrics["init_epochs"] == 2 and record.metrics["epochs_completed"] == 1
    init_lr = 0.01 if method == "ft" else 0.05  # resnet8 is a CIFAR ResNet; its base lr is 0.05
    assert [e["lr"] for e in record.epochs] == [init_lr, init_lr, 0.05]
    init_terms = {f"loss_{t}" for t in INIT_TERM[method]}
    main_terms = {f"loss_{t}" for t in {"ce"} | MAIN_TERM[method]}  # the official protocol: no KD
    assert [{k for k in e if k.startswith("loss_")} for e in record.epochs] == [init_terms] * 2 + [main_terms]


@pytest.mark.parametrize("method", ("ab", "fsp"))
def test_ab_and_fsp_init_trains_the_student_features_not_its_head(harness_runs, method):
    records, snapshots, _ = harness_runs
    (s0, m0), (s1, m1), (s2, m2), (s3, m3) = snapshots[records[method].run_id]
    features = set(s0) - {"fc.weight", "fc.bias"}
    assert changed(s0, s1) == changed(s1, s2) == features  # every feature parameter learns in each init epoch
    assert changed(s2, s3) == set(s0)  # the main stage trains the head too
    if method == "ab":
        assert len(m0) == 12 and changed(m0, m1) == changed(m1, m2) == set(m0)  # 3 × (1×1 conv, BN)
        assert not changed(m2, m3)  # frozen after the init stage
        assert records[method].metrics["extra_params_train"] == sum(p.numel() for p in m0.values())


def test_ft_init_trains_the_paraphraser_alone_and_main_leaves_it_frozen(harness_runs):
    records, snapshots, _ = harness_runs
    (s0, m0), (s1, m1), (s2, m2), (s3, m3) = snapshots[records["ft"].run_id]
    # the student is not trained in init, and runs in eval mode there: its BN statistics stay put too (RepDistiller)
    assert not changed(s0, s2) and not changed(m0, m2, "translator")
    assert changed(m0, m1, "paraphraser") == changed(m1, m2, "paraphraser") == {n for n in m0 if "paraphraser" in n}
    assert not changed(m2, m3, "paraphraser")
    assert changed(s2, s3) == set(s0) and changed(m2, m3, "translator") == {n for n in m0 if "translator" in n}
    translator = sum(v.numel() for n, v in m0.items() if n.startswith("translator"))
    paraphraser = sum(v.numel() for n, v in m0.items() if n.startswith("paraphraser"))
    assert records["ft"].metrics["extra_params_train"] == translator
    assert records["ft"].metrics["frozen_aux_params"] == paraphraser


def test_a_resume_inside_the_init_stage_ends_as_the_uninterrupted_run(harness_runs, tmp_path, monkeypatch):
    records, _, teacher = harness_runs
    reference = records["ab"]
    env = RunEnv(ResultsStore(tmp_path / "resumed"), progress=False)
    run_sweep([teacher.spec], env)
    run_interrupted(monkeypatch, [reference.spec], env, 3)  # the teacher check, init epoch 1, then init epoch 2
    assert [e["epoch"] for e in env.store.load_record(reference.spec.run_id).epochs] == [-1]
    resumed = run_sweep([reference.spec], env)[0]
    keys = ("epoch", "top1", "loss", "loss_ab", "lr")
    assert resumed.status == "finished"
    assert [tuple(e.get(k) for k in keys) for e in resumed.epochs] == [tuple(e.get(k) for k in keys)
                                                                       for e in reference.epochs]



def test_eval_every_counts_in_each_stage_and_leaves_the_training_as_it_was(harness_runs, tmp_path):
    """With ``eval_every`` = 2, a 2-epoch init stage is evaluated after its last epoch only, as a main stage would be
    (Recipe.evaluates): FT's 30 paraphraser epochs no longer evaluate an unchanged student 30 times. The skipped
    evaluations change nothing else: the losses and the test top-1 match the run that evaluated every epoch."""
    records, _, _ = harness_runs
    sparse = dataclasses.replace(MICRO, eval_every=2)
    assert [sparse.evaluates(e, 3) for e in range(3)] == [False, True, True] and sparse.evaluates(0)
    plan = tiny_sweep(methods=("ft",), pair=("wrn_16_2", "resnet8"), recipe=sparse,
                      method_options=(("ft", "init_epochs", "2"),)).plan()
    *_, ft = run_sweep(plan, RunEnv(ResultsStore(tmp_path / "results"), progress=False))
    assert ft.status == "finished", ft.error
    assert [e["epoch"] for e in ft.epochs if "top1" in e] == [0, 1]
    every = records["ft"].epochs
    assert all("top1" in e for e in every)
    for key in ("loss", "loss_paraphraser", "loss_ft", "loss_ce"):
        assert [e.get(key) for e in ft.epochs] == [e.get(key) for e in every], key
    assert [e["top1"] for e in ft.epochs[1:]] == [e["top1"] for e in every[1:]]
