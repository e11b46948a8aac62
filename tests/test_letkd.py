"""letKD (methods/letkd.py): the KD layer, its cost (methods.md §7.8), options, presets and pair defaults (§7.4),
the targets, the faiss offline fit on every location (or the recipe's cap) and its cache, the deployed
"student + KD layer", and every reference pair through the harness."""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import faiss
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_sweep
from torch.utils.flop_counter import FlopCounterMode

import kdbench.methods.letkd as letkd
import kdbench.methods.letkd_fit as letkd_fit
import kdbench.methods.letkd_layer as letkd_layer
from kdbench.errors import KdbenchError
from kdbench.harness import run_sweep, sha256_file
from kdbench.measure import macs_per_image
from kdbench.methods import method_class
from kdbench.methods.base import MethodContext, Preparation, StepOutputs, kd_divergence
from kdbench.models import create_model
from kdbench.models.taps import FeatureExtractor, feature_shapes
from kdbench.spec import PROTOCOLS, Pair, Recipe

LetKD1, LetKD2 = method_class("letkd1"), method_class("letkd2")


@functools.lru_cache(maxsize=None)
def shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return feature_shapes(create_model(arch, num_classes=10), (3, 32, 32))


def build(cls, student, teacher, num_classes=10, protocol="crd", **overrides):
    """``cls`` as the harness builds it: options resolved (defaults, preset, pair defaults, overrides)."""
    options = dict(cls.resolve_options(overrides, protocol, teacher, student))
    return cls(MethodContext(shapes(student), shapes(teacher), protocol, 8, num_classes, options))


# ------------------------------------------------------------------------------------------------ the KD layer (§7.1)


def test_cosine_conv_ignores_the_input_scale():
    torch.manual_seed(0)
    conv = letkd_layer.CosineConv(16, 32, scale=3.0)
    x = torch.randn(2, 16, 4, 4)
    assert torch.allclose(conv(x), conv(3 * x), atol=1e-6)
    assert torch.allclose(conv(x), conv(0.01 * x), atol=1e-6)
    assert conv(x).abs().max() <= 3.0 + 1e-5  # scale · cosine
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 16), rel=0.2)  # normal(0, sqrt(2/in))
    assert conv.scale.item() == 3.0 and conv.scale.requires_grad


def test_kd_layer_shapes_and_residual():
    torch.manual_seed(0)
    layer = letkd_layer.KDLayer(64, 128, alpha=1.0)
    assert layer.templates.scale.item() == 3.0 and layer.semantic.scale.item() == 1.0  # s1, s2 init
    x = torch.randn(2, 64, 8, 8)
    out, scores = layer(x)
    assert out.shape == x.shape and scores.shape == (2, 128, 8, 8)
    assert not torch.allclose(out, x)
    layer.alpha.fill_(0.0)  # α = 0: the layer is only an auxiliary predictor
    assert torch.equal(layer(x)[0], x)


# methods.md §7.8: millions of parameters of the penultimate (K = 4096) and intermediate (K = 800) layers.
COST_M = {"resnet20": (0.532, 0.104), "resnet32": (0.532, 0.104), "resnet8x4": (2.105, 0.411),
          "wrn_16_2": (1.057, 0.206), "wrn_40_1": (0.532, 0.104), "ShuffleV1": (7.873, 1.538),
          "ShuffleV2": (8.397, 0.744), "MobileNetV2": (10.494, 0.130)}


@pytest.mark.parametrize("student", list(COST_M))
def test_layer_parameters_match_the_cost_table(student):
    method = build(LetKD2, student, student, num_classes=100)  # default K: 4096 and 8 · 100
    penult, inter = (sum(p.numel() for p in method.kd_layers[t].parameters())
                     for t in ("pre_pool", "last_stage_first_block"))
    assert (round(penult / 1e6, 3), round(inter / 1e6, 3)) == COST_M[student]
    c_p, c_i = shapes(student)["pre_pool"][0], shapes(student)["last_stage_first_block"][0]
    assert penult == 2 * c_p * 4096 + 2 * 4096 + 2 and inter == 2 * c_i * 800 + 2 * 800 + 2
    assert method.extra_params_inference() == method.extra_params_train() == penult + inter
    assert build(LetKD1, student, student, num_classes=100).extra_params_inference() == penult


def test_layer_macs_match_the_cost_table():
    method = build(LetKD2, "resnet20", "resnet56", num_classes=100)
    macs = {}
    for tap, (c, h, w) in (("pre_pool", (64, 8, 8)), ("last_stage_first_block", (64, 8, 8))):
        with FlopCounterMode(display=False) as counter:
            method.kd_layers[tap].eval()(torch.zeros(1, c, h, w))
        macs[tap] = counter.get_total_flops() / 2
    assert round(macs["pre_pool"] / 1e6, 1) == 33.6 and round(macs["last_stage_first_block"] / 1e6, 1) == 6.6


def test_options_and_markers():
    assert LetKD1.note == LetKD2.note == "student + KD layer"
    assert "student + KD layer" in LetKD1.__doc__ and "student + KD layer" in LetKD2.__doc__
    d = LetKD2.defaults
    assert (d["k_penult"], d["k_sub"], d["lda_components"], d["assign_temperature"], d["kmeans_iters"]) == (
        4096, 8, 60, 1.0, 20)
    assert (d["alpha_penult"], d["alpha_inter"], d["penult_weight"], d["inter_weight"]) == (1, 1, 1, 1)
    # the base class's logit options: no logit KD unless a preset or the user asks; its T is the KD temperature
    assert (d["ce_weight"], d["kd_weight"], d["temperature"], d["kl_reduction"]) == (1, 0, 4.0, "batchmean")
    assert "k_sub" not in LetKD1.defaults and "inter_weight" not in LetKD1.defaults
    for removed in ("logit_kd", "w_penult", "w_inter", "fit_points", "kmeans"):
        assert removed not in d
        with pytest.raises(KdbenchError, match="has no option"):
            LetKD2.resolve_options({removed: "1"})
    method = build(LetKD2, "resnet20", "resnet56")  # 10 classes: LDA components min(60, 9)
    assert method.lda_components == 9 and method.decision.shape == (80, 80)
    assert method.teacher_taps == ("pre_pool", "last_stage_first_block") and method.student_taps == ()


@pytest.mark.parametrize("cls", [LetKD1, LetKD2])
def test_presets_give_the_documented_weights_per_protocol(cls):
    assert set(cls.presets) == set(PROTOCOLS) == {"official", "crd", "semckd"}
    # official = the letKD code: CE + L_penult (+ L_inter), no logit KD; crd: the same; semckd: + 1·KD_4 (§7.4, §0.3)
    for protocol, kd_weight in (("official", 0.0), ("crd", 0.0), ("semckd", 1.0)):
        options = dict(cls.resolve_options({}, protocol, "resnet56", "resnet20"))
        assert (options["ce_weight"], options["kd_weight"], options["penult_weight"]) == (1.0, kd_weight, 1.0)
        assert options["temperature"] == 4.0 and options["assign_temperature"] == 1.0
        assert options.get("inter_weight", 1.0) == 1.0 and ("inter_weight" in options) == cls.use_inter
        assert cls.label(options) == cls.name + (" (+KD)" if kd_weight else "")
    options = dict(cls.resolve_options({"kd_weight": "0.5", "temperature": "2"}, "official"))
    assert (options["kd_weight"], options["temperature"]) == (0.5, 2.0)  # the user's --set wins over the preset


def test_resnet50_mobilenetv2_gets_its_official_alphas_and_an_override_wins():
    assert LetKD2.pair_defaults("ResNet50", "MobileNetV2") == {"alpha_penult": 0.1, "alpha_inter": 0.2}
    assert LetKD1.pair_defaults("ResNet50", "MobileNetV2") == {"alpha_penult": 0.1}  # letkd1 has no inter layer
    for teacher, student in (("resnet56", "resnet20"), ("resnet32x4", "ShuffleV2"), ("MobileNetV2", "ResNet50")):
        assert LetKD2.pair_defaults(teacher, student) == {}
        options = dict(LetKD2.resolve_options({}, "official", teacher, student))
        assert (options["alpha_penult"], options["alpha_inter"]) == (1.0, 1.0)
    for protocol in PROTOCOLS:  # under every protocol
        options = dict(LetKD2.resolve_options({}, protocol, "ResNet50", "MobileNetV2"))
        assert (options["alpha_penult"], options["alpha_inter"]) == (0.1, 0.2)
    options = dict(LetKD2.resolve_options({"alpha_penult": "1"}, "official", "ResNet50", "MobileNetV2"))
    assert (options["alpha_penult"], options["alpha_inter"]) == (1.0, 0.2)
    # ... and the KD layers are built with them
    method = build(LetKD2, "MobileNetV2", "ResNet50", alpha_inter="0.5")
    assert method.kd_layers["pre_pool"].alpha.item() == pytest.approx(0.1)
    assert method.kd_layers["last_stage_first_block"].alpha.item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ targets (§7.2, §7.3)


def test_penultimate_targets_are_soft_assignments():
    g = torch.Generator().manual_seed(0)
    feats, centres = torch.randn(50, 8, generator=g), torch.randn(16, 8, generator=g)
    p = letkd_fit.visual_word_targets(feats, centres, temperature=0.5)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(50))
    assert torch.allclose(p, F.softmax(-0.5 * torch.cdist(feats, centres) ** 2, dim=1), atol=1e-5)


def test_the_soft_assignment_uses_assign_temperature_not_the_kd_temperature():
    method = build(LetKD1, "resnet20", "resnet56", k_penult=16, assign_temperature="0.05", temperature="7")
    g = torch.Generator().manual_seed(0)
    method.penult_centres.normal_(generator=g)
    teacher_map = torch.randn(2, *shapes("resnet56")["pre_pool"], generator=g)
    rows = teacher_map.permute(0, 2, 3, 1).reshape(-1, teacher_map.shape[1])
    expected = F.softmax(-0.05 * torch.cdist(rows, method.penult_centres) ** 2, dim=1)
    assert torch.allclose(method.penult_targets(teacher_map, 2), expected, atol=1e-5)


def test_method_targets_are_distributions_on_the_student_grid():
    # resnet32x4 -> ShuffleV2: the 8x8 teacher maps are pooled to the student's 4x4 (§7.2 downscale)
    method = build(LetKD2, "ShuffleV2", "resnet32x4", k_penult=32, k_sub=3)
    g = torch.Generator().manual_seed(0)
    method.penult_centres.normal_(generator=g)
    method.lda_weight.normal_(generator=g)
    z = torch.randn(600, method.lda_components, generator=g)
    labels = torch.arange(600) % 10
    centres, decision, _ = letkd_fit.fit_subclasses(z, labels, 10, 3, 5, 0)
    method.inter_centres.copy_(centres)
    method.decision.copy_(decision)
    teacher = {t: torch.randn(4, *shapes("resnet32x4")[t], generator=g) for t in method.teacher_taps}
    y = torch.tensor([0, 3, 3, 9])
    for targets, k in ((method.penult_targets(teacher["pre_pool"], 4), 32),
                       (method.inter_targets(teacher["last_stage_first_block"], y), 30)):
        assert targets.shape == (4 * 4 * 4, k)
        assert (targets >= 0).all() and torch.allclose(targets.sum(1), torch.ones(64))
    inter = method.inter_targets(teacher["last_stage_first_block"], y).view(4, 16, 30)
    # each location's target is a decision row of one of its own class's sub-classes
    for b, label in enumerate(y.tolist()):
        rows = decision[label * 3:(label + 1) * 3]
        assert all(any(torch.equal(t, r) for r in rows) for t in inter[b])


def test_teacher_maps_are_pooled_or_targets_repeated_onto_the_student_grid():
    pooled = letkd.Site("pre_pool", (16, 4, 4), (8, 8, 8))  # teacher larger: average-pooled before quantising
    assert pooled.fit_size == (4, 4)
    t = torch.randn(2, 8, 8, 8)
    assert torch.allclose(pooled.teacher_rows(t), F.avg_pool2d(t, 2).permute(0, 2, 3, 1).reshape(32, 8))
    small = letkd.Site("pre_pool", (16, 4, 4), (8, 2, 2))  # teacher smaller: targets repeated (nearest)
    assert small.fit_size == (2, 2) and small.teacher_rows(torch.randn(2, 8, 2, 2)).shape == (8, 8)
    targets = F.softmax(torch.randn(8, 5), dim=1)
    grid = small.to_student_grid(targets, 2).view(2, 4, 4, 5)
    assert torch.equal(grid[0, 1, 1], targets[0]) and torch.equal(grid[1, 3, 2], targets[4 + 3])
    assert torch.allclose(grid.sum(-1), torch.ones(2, 4, 4))


def test_decision_matrix_rows_are_distributions():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(200) % 5
    z = torch.randn(200, 4, generator=g) + labels[:, None].float()
    labels[labels == 4] = 3  # class 4 has no locations: its sub-classes get one-hot rows
    centres, decision, info = letkd_fit.fit_subclasses(z, labels, 5, 4, 5, 0)
    assert centres.shape == (20, 4) and decision.shape == (20, 20)
    assert (decision >= 0).all() and torch.allclose(decision.sum(1), torch.ones(20))
    assert info["classes_short_of_points"] == 1
    assert torch.equal(decision[16:], torch.eye(20)[16:])


def test_location_kl_is_the_batch_mean_over_locations():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 5, 3, 3, generator=g)
    targets = F.softmax(torch.randn(18, 5, generator=g), dim=1)
    rows = scores.permute(0, 2, 3, 1).reshape(18, 5)
    manual = (targets * (targets.log() - F.log_softmax(rows, dim=1))).sum(1).mean()
    assert torch.allclose(letkd_fit.location_kl(scores, targets), manual, atol=1e-6)


def blobs(k, per_blob, dim=8, seed=3):
    """``k`` well-separated Gaussian blobs (centres 10·e_j, std 0.3), ``per_blob`` points each, blob by blob."""
    g = torch.Generator().manual_seed(seed)
    means = 10 * torch.eye(k, dim)
    return means, (means[:, None] + 0.3 * torch.randn(k, per_blob, dim, generator=g)).reshape(-1, dim)


def match(means, centres):
    """For each mean, the index of the nearest centre and the distance to it."""
    d = torch.cdist(means.double(), centres.double())
    return d.argmin(1), d.min(1).values


def test_faiss_kmeans_clusters_every_point_and_recovers_the_blobs():
    # 2 × 300 points: more than faiss's default cap of 256 points per centre, which would silently subsample.
    means, x = blobs(2, 300)
    centres = letkd_fit.kmeans(x, 2, 20, 0)
    assert centres.shape == (2, 8) and centres.dtype == torch.float32
    order, dist = match(means, centres)
    assert sorted(order.tolist()) == [0, 1] and dist.max() < 0.1
    # Every point is used: each centre is the mean of *all* its blob's points (Lloyd's fixed point).
    full = x.view(2, 300, 8).double().mean(1)
    assert torch.allclose(centres[order].double(), full, atol=1e-4)
    # With faiss's default max_points_per_centroid the centres are means of a 512-point subsample instead.
    default = faiss.Kmeans(8, 2, niter=20, seed=0, verbose=False)
    default.train(x.numpy())
    subsampled = torch.from_numpy(default.centroids)[match(means, torch.from_numpy(default.centroids))[0]]
    assert not torch.allclose(subsampled.double(), full, atol=1e-4)
    # seeded: the same fit again
    assert torch.equal(letkd_fit.kmeans(x, 2, 20, 0), centres)
    with pytest.raises(KdbenchError, match="at least 700"):
        letkd_fit.kmeans(x, 700, 20, 0)


def test_faiss_kmeans_runs_kmeans_iters_rounds_from_faiss_random_init(monkeypatch):
    means, x = blobs(4, 100)
    seen = {}

    class Recording(faiss.Kmeans):
        def __init__(self, d, k, **kwargs):
            seen.update(kwargs, d=d, k=k)
            super().__init__(d, k, **kwargs)

        def train(self, data, weights=None, init_centroids=None):
            seen.update(rows=data.shape[0], init_centroids=init_centroids)
            return super().train(data, weights, init_centroids)

    monkeypatch.setattr(faiss, "Kmeans", Recording)
    centres = letkd_fit.kmeans(x, 4, 7, 11)
    assert seen["rows"] == 400 and (seen["d"], seen["k"], seen["niter"], seen["seed"]) == (8, 4, 7, 11)
    assert seen["max_points_per_centroid"] * 4 >= 400  # faiss keeps every point
    assert seen["init_centroids"] is None  # faiss's own (random) initialisation
    # whatever the initialisation found, the centres are a Lloyd fixed point of all 400 points
    nearest = torch.cdist(x, centres).argmin(1)
    for j in nearest.unique():
        assert torch.allclose(x[nearest == j].double().mean(0), centres[j].double(), atol=1e-4)


def test_locations_keep_every_row_or_a_uniform_capped_sample():
    rows = torch.arange(1000, dtype=torch.float32)[:, None]
    labels = torch.arange(1000) % 7
    every = letkd_fit.Locations(None, torch.Generator().manual_seed(0))
    for i in range(0, 1000, 64):
        every.add(rows[i:i + 64], labels[i:i + 64])
    kept, kept_labels = every.result()
    assert every.seen == 1000 and torch.equal(kept, rows) and torch.equal(kept_labels, labels)
    picks = []
    for batch in (7, 100):
        sample = letkd_fit.Locations(50, torch.Generator().manual_seed(0))
        for i in range(0, 1000, batch):
            sample.add(rows[i:i + batch], labels[i:i + batch])
        picked, picked_labels = sample.result()
        assert picked.shape == (50, 1) and picked.unique().numel() == 50
        assert torch.equal(picked_labels, picked.flatten().long() % 7)  # rows keep their labels
        picks.append(set(picked.flatten().tolist()))
    assert sample.seen == 1000
    assert picks[0] == picks[1]  # independent of the batching
    other = letkd_fit.Locations(50, torch.Generator().manual_seed(1))
    other.add(rows, labels)
    assert set(other.result()[0].flatten().tolist()) != picks[0]  # seeded, and the seed matters


# ------------------------------------------------------------------------------------------------ offline fit + cache


def _preparation(cache_dir, teacher="resnet8", images=16, taps=("pre_pool", "last_stage_first_block"),
                 fit_points=None):
    torch.manual_seed(0)
    model = create_model(teacher, num_classes=10).eval()
    extractor = FeatureExtractor(model, list(taps))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(images, 3, 32, 32, generator=g), torch.arange(images) % 10

    def batches(_pass):
        for i in range(0, images, 8):
            yield x[i:i + 8], y[i:i + 8]

    def teacher_forward(images):
        with torch.no_grad():
            return extractor(images)

    return Preparation(teacher_forward, batches, lambda: batches(0), cache_dir, torch.device("cpu"),
                       fit_points=fit_points)


SMALL = dict(k_penult=16, k_sub=2)


# A synthetic teacher: "images" are indices into generated 2x2 feature maps (8 channels) of 200 images, 800
# locations per tap. Penultimate locations fall in two blobs of 400 (more than faiss's default 256 points per
# centre); the intermediate ones are labelled with their image's class (2 classes).
def synthetic(cache_dir, fit_points=None):
    means, penult_rows = blobs(2, 400)
    blob = torch.arange(800) // 400
    order = torch.randperm(800, generator=torch.Generator().manual_seed(0))  # blobs mixed over the images
    penult_rows, blob = penult_rows[order], blob[order]
    labels = torch.arange(200) % 2
    g = torch.Generator().manual_seed(1)
    inter_rows = torch.randn(800, 8, generator=g) + 4 * labels.repeat_interleave(4)[:, None].float()
    maps = {"pre_pool": penult_rows, "last_stage_first_block": inter_rows}
    maps = {tap: rows.view(200, 2, 2, 8).permute(0, 3, 1, 2) for tap, rows in maps.items()}

    def teacher(idx):
        return torch.zeros(idx.shape[0], 2), {tap: m[idx] for tap, m in maps.items()}

    def batches(_pass):
        for i in range(0, 200, 16):
            idx = torch.arange(i, min(i + 16, 200))
            yield idx, labels[idx]

    prep = Preparation(teacher, batches, lambda: batches(0), cache_dir, torch.device("cpu"), fit_points=fit_points)
    full = torch.stack([penult_rows[blob == j].double().mean(0) for j in (0, 1)])  # the blobs' means, all points
    return prep, means, full


def synthetic_method(**overrides):
    taps = ("pre_pool", "last_stage_first_block")
    options = dict(LetKD2.resolve_options({"k_penult": 2, "k_sub": 2, **overrides}, "official"))
    return LetKD2(MethodContext({t: (16, 2, 2) for t in taps}, {t: (8, 2, 2) for t in taps}, "official", 8, 2,
                                options))


def test_the_fit_clusters_every_location_and_reports_it(tmp_path):
    prep, means, full = synthetic(tmp_path)
    method = synthetic_method()
    method.prepare(prep)
    centres = method.penult_centres
    order, dist = match(means, centres)
    assert sorted(order.tolist()) == [0, 1] and dist.max() < 0.1  # the blobs are recovered...
    assert torch.allclose(centres[order].double(), full, atol=1e-4)  # ...as the means of all their 800 locations
    metrics = method.fit_metrics()
    assert set(metrics) == {f"fit_{m}_{kind}" for m in ("locations", "points", "s") for kind in ("penult", "inter")}
    assert metrics["fit_locations_penult"] == metrics["fit_points_penult"] == 800
    assert metrics["fit_locations_inter"] == metrics["fit_points_inter"] == 800
    assert metrics["fit_s_penult"] > 0 and metrics["fit_s_inter"] > 0
    meta = method.fit_meta["penult"]
    assert meta["fit_points_cap"] is None and meta["fit_s"] == pytest.approx(meta["extract_s"] + meta["cluster_s"])
    assert torch.allclose(method.decision.sum(1), torch.ones(4))
    assert method.fit_meta["inter"]["empty_subclasses"] == 0
    # a method that loads the artefacts reports the same fit
    reloaded = synthetic_method()
    reloaded.prepare(prep)
    assert reloaded.fit_metrics() == metrics and torch.equal(reloaded.penult_centres, centres)


def test_the_recipe_cap_is_honoured_recorded_and_keyed(tmp_path):
    full_prep, means, full = synthetic(tmp_path)
    synthetic_method().prepare(full_prep)
    capped_prep, _, _ = synthetic(tmp_path, fit_points=300)
    method = synthetic_method()
    method.prepare(capped_prep)
    assert len(list(tmp_path.iterdir())) == 4  # a new pair of artefacts beside the uncapped ones
    metrics = method.fit_metrics()
    assert (metrics["fit_locations_penult"], metrics["fit_points_penult"]) == (800, 300)
    assert (metrics["fit_locations_inter"], metrics["fit_points_inter"]) == (800, 300)
    assert method.fit_meta["penult"]["fit_points_cap"] == 300
    assert {k["fit_points"] for k in method.artefact_keys(300).values()} == {300}
    for kind, key in method.artefact_keys(300).items():
        stored = torch.load(method.artefact_path(tmp_path, key), weights_only=True)
        assert stored["key"]["fit_points"] == 300 and stored["meta"]["points"] == 300, kind
    order, dist = match(means, method.penult_centres)
    assert dist.max() < 0.1  # a uniform sample still finds the blobs, but from 300 of the 800 locations
    assert not torch.allclose(method.penult_centres[order].double(), full, atol=1e-4)


@pytest.mark.parametrize("options, context, message", [
    (dict(k_penult=4), dict(fit_points=3), "the fit at pre_pool would cluster 3 feature locations into 4 centres"),
    (dict(k_penult=9), dict(num_train=2), "the fit at pre_pool would cluster 8 feature locations into 9 centres"),
    (dict(k_sub=10), dict(num_train=3, fit_points=100),  # 3 images x 2x2 locations; k_sub 10 x 2 classes
     "at last_stage_first_block would cluster 12 feature locations into 20 centres; use more training images, a "
     "larger fit_points cap in the recipe, or a smaller letkd2.k_sub"),
])
def test_a_fit_with_fewer_locations_than_centres_fails_when_the_method_is_built(options, context, message):
    """Methods are built when the sweep is planned (SweepSpec._check): it stops before any teacher trains."""
    taps = ("pre_pool", "last_stage_first_block")
    options = dict(LetKD2.resolve_options({"k_penult": 2, "k_sub": 2, **options}, "official"))
    with pytest.raises(KdbenchError, match=re.escape(message)):
        LetKD2(MethodContext({t: (16, 2, 2) for t in taps}, {t: (8, 2, 2) for t in taps}, "official", 8, 2, options,
                             **context))
    LetKD2(MethodContext({t: (16, 2, 2) for t in taps}, {t: (8, 2, 2) for t in taps}, "official", 8, 2, options))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One letkd2 fit (resnet8 teacher, 16 random images, the recipe's cap at 512 of their 1024 locations); the
    tests below reuse its cache, as runs do."""
    prep = _preparation(tmp_path_factory.mktemp("teacher-run") / "artefacts", fit_points=512)
    method = build(LetKD2, "resnet8", "resnet8", **SMALL)
    assert not bool(method.fitted)
    method.prepare(prep)
    return prep, method


def test_prepare_fits_once_and_the_cache_is_reused(fitted, monkeypatch):
    prep, first = fitted
    assert bool(first.fitted) and first.penult_centres.abs().sum() > 0
    files = sorted(p.name for p in prep.cache_dir.iterdir())
    assert len(files) == 2 and all(f.startswith(("letkd-penult-", "letkd-inter-")) for f in files)
    assert first.fit_meta["penult"]["points"] == 512 and first.fit_meta["penult"]["locations"] == 16 * 64
    assert first.fit_meta["penult"]["fit_s"] > 0 and first.fit_meta["inter"]["points"] == 512
    assert first.fit_metrics()["fit_points_penult"] == 512 and first.fit_metrics()["fit_locations_inter"] == 1024
    mtimes = {p: p.stat().st_mtime_ns for p in prep.cache_dir.iterdir()}

    def no_fit(*args, **kwargs):
        raise AssertionError("refitted although the cache holds the artefacts")

    monkeypatch.setattr(letkd, "kmeans", no_fit)
    monkeypatch.setattr(letkd, "fit_lda", no_fit)
    second = build(LetKD2, "resnet8", "resnet8", **SMALL)
    second.prepare(prep)
    for name, value in first.state_dict().items():
        if not name.startswith("kd_layers"):
            assert torch.equal(second.state_dict()[name], value), name
    letkd1 = build(LetKD1, "resnet8", "resnet8", k_penult=16)  # shares letkd2's penultimate artefact
    letkd1.prepare(prep)
    assert torch.equal(letkd1.penult_centres, first.penult_centres)
    # the fit a run reused still counts in its end-to-end cost; the run that fitted paid it in prepare_s
    assert first.reused_fit_s() == 0.0 and letkd1.reused_fit_s() == first.fit_meta["penult"]["fit_s"]
    assert second.reused_fit_s() == pytest.approx(first.fit_meta["penult"]["fit_s"] + first.fit_meta["inter"]["fit_s"])
    assert {p: p.stat().st_mtime_ns for p in prep.cache_dir.iterdir()} == mtimes

    assert letkd1.fit_metrics() == {k: v for k, v in first.fit_metrics().items() if k.endswith("_penult")}

    # Anything that determines the artefact is in its key: another cap (or none) is a new fit.
    for cap in (256, None):
        with pytest.raises(AssertionError, match="refitted"):
            build(LetKD1, "resnet8", "resnet8", k_penult=16).prepare(dataclasses.replace(prep, fit_points=cap))


def test_a_resumed_method_has_the_fit_without_prepare(fitted):
    _, method = fitted
    resumed = build(LetKD2, "resnet8", "resnet8", **SMALL)
    resumed.load_state_dict(method.state_dict())
    assert bool(resumed.fitted) and torch.equal(resumed.decision, method.decision)


def _step(method, student, teacher_fx, x, y, keep=None):
    logits = student(x)
    with torch.no_grad():
        t_logits, t_features = teacher_fx(x)
    if keep is not None:
        keep.update(student=logits.detach(), teacher=t_logits)
    return method.losses(StepOutputs(y, logits, {}, t_logits, t_features))


def test_loss_terms_follow_the_weights_and_protocols(fitted):
    prep, _ = fitted
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    teacher_fx = FeatureExtractor(create_model("resnet8", num_classes=10).eval(),
                                  ("pre_pool", "last_stage_first_block"))
    cases = {"official": ("official", {}), "crd": ("crd", {}), "semckd": ("semckd", {}),
             "crd+kd": ("crd", {"kd_weight": "0.5", "temperature": "2", "kl_reduction": "mean"}),
             "reweighted": ("official", {"penult_weight": "2", "inter_weight": "0", "ce_weight": "0.5"})}
    terms, logits = {}, {}
    for case, (protocol, overrides) in cases.items():
        torch.manual_seed(0)  # the same student and KD layers in every case
        student = create_model("resnet8", num_classes=10).train()
        method = build(LetKD2, "resnet8", "resnet8", protocol=protocol, **SMALL, **overrides)
        method.attach(student)
        method.prepare(prep)
        logits[case] = {}
        terms[case] = _step(method, student, teacher_fx, x, y, keep=logits[case])
        assert all(torch.isfinite(v) and v >= 0 for v in terms[case].values())
        sum(terms[case].values()).backward()
        for layer in method.kd_layers.values():
            assert layer.templates.weight.grad.abs().sum() > 0 and layer.semantic.scale.grad is not None
    # official and crd: CE + L_penult + L_inter, no logit KD (§7.4)
    assert set(terms["official"]) == set(terms["crd"]) == {"ce", "penult", "inter"}
    assert all(torch.equal(terms["official"][k], terms["crd"][k]) for k in terms["official"])
    # semckd, or any kd_weight > 0, adds kd_weight·KD_T with the logit options' temperature and reduction
    assert set(terms["semckd"]) == set(terms["crd+kd"]) == {"ce", "kd", "penult", "inter"}
    s, t = logits["semckd"]["student"], logits["semckd"]["teacher"]
    assert torch.allclose(terms["semckd"]["kd"], kd_divergence(s, t, 4.0))
    assert torch.allclose(terms["crd+kd"]["kd"], 0.5 * kd_divergence(s, t, 2.0) / 10)  # "mean": ÷ classes
    assert terms["crd+kd"]["kd"] > 0
    # the method's own weights scale its terms; a zero weight leaves its term out
    assert set(terms["reweighted"]) == {"ce", "penult"}
    assert torch.allclose(terms["reweighted"]["penult"], 2 * terms["official"]["penult"])
    assert torch.allclose(terms["reweighted"]["ce"], 0.5 * terms["official"]["ce"])
    student.eval()
    student(x)  # eval forwards keep no scores: a loss without a training forward is an error
    with pytest.raises(RuntimeError, match="no KD-layer scores"):
        method.losses(StepOutputs(y, student(x), {}, None, teacher_fx(x)[1]))


# ------------------------------------------------------------------------------------------------ deployment


def test_exported_student_reproduces_the_training_forward(fitted, tmp_path):
    prep, _ = fitted
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10)
    method = build(LetKD2, "resnet8", "resnet8", **SMALL)
    method.attach(student)
    method.prepare(prep)
    teacher_fx = FeatureExtractor(create_model("resnet8", num_classes=10).eval(), method.teacher_taps)
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    student.train(), method.train()
    for _ in range(2):  # move weights and BN statistics (of the student and of the KD layers) off their init
        opt.zero_grad()
        sum(_step(method, student, teacher_fx, x, y).values()).backward()
        opt.step()
    student.eval()
    with torch.no_grad():
        training_forward = student(x)  # what the harness evaluates each epoch: the student with the hooked layers
        plain = create_model("resnet8", num_classes=10)
        plain.load_state_dict(student.state_dict())
        assert not torch.allclose(plain.eval()(x), training_forward)  # the layers matter

    trainable = method.extra_params_train()
    deployed = method.export(student)
    assert method.export(student) is deployed  # idempotent: the layers are hooked once
    assert method.extra_params_train() == trainable and not any(k.startswith("student") for k in method.state_dict())
    assert isinstance(deployed, letkd_layer.LetKDStudent) and deployed.note == "student + KD layer"
    deployed.eval()
    with torch.no_grad():
        assert torch.allclose(deployed(x), training_forward, atol=1e-6)
    n_student = sum(p.numel() for p in student.parameters())
    assert sum(p.numel() for p in deployed.parameters()) - n_student == method.extra_params_inference()
    assert macs_per_image(deployed, (3, 32, 32)) - macs_per_image(plain, (3, 32, 32)) == 8 * 8 * 2 * 64 * (16 + 20)

    path = tmp_path / "weights.pt"
    torch.save(deployed.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert {k.split(".")[0] for k in state} == {"student", "kd_layers"}
    torch.manual_seed(123)
    rebuilt = letkd_layer.LetKDStudent.from_state_dict(create_model("resnet8", num_classes=10), state).eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), training_forward, atol=1e-6)
    assert deployed.training is False and all(not m.training for m in method.kd_layers.modules())


# ------------------------------------------------------------------------------------------------ end to end (§7.5)

# The reference pairs of §7.5 that the zoo holds, grouped by teacher so that a teacher trains once per sweep.
REFERENCE_PAIRS = {"resnet56": ("resnet20",), "resnet32x4": ("resnet8x4", "ShuffleV2"),
                   "wrn_40_2": ("wrn_16_2", "ShuffleV1"), "ResNet50": ("MobileNetV2",)}
# Two steps of batch 4 (CPU time: the teachers are up to 1.3 GMAC per image). Eight images give at most 8·4 = 32 fit
# locations (ResNet50 -> MobileNetV2, pooled to 2x2), so K is reduced through the options here (k-means needs a
# location per centre); the default K = 4096 / 8·classes layers are checked against §7.8 above.
FEW = Recipe("few", epochs=1, batch_size=4, train_subset=8, test_subset=8, warmup_steps=0)
OPTIONS = tuple((m, "k_penult", "16") for m in ("letkd1", "letkd2")) + (("letkd2", "k_sub", "2"),)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", list(REFERENCE_PAIRS))
def test_every_reference_pair_trains(env, tmp_path, teacher):
    # The teacher is imported as a checkpoint (a seeded random init) rather than trained: training it is not
    # letKD's business, and on CPU it would dominate this test's time.
    torch.manual_seed(0)
    path = tmp_path / f"{teacher}.pth"
    torch.save({"model": create_model(teacher, num_classes=10).state_dict()}, path)
    digest = sha256_file(path)
    env = dataclasses.replace(env, checkpoints={digest: path})
    students = REFERENCE_PAIRS[teacher]
    sweep = tiny_sweep(methods=("letkd1", "letkd2"), recipe=FEW, method_options=OPTIONS, teacher_ckpt_sha256=digest)
    sweep = dataclasses.replace(sweep, pairs=tuple(Pair(teacher, s) for s in students))
    records = run_sweep(sweep.plan(), env)
    teacher_run, *runs = records
    assert [(r.spec.student, r.spec.method) for r in runs] == [(s, m) for s in students for m in ("letkd1", "letkd2")]
    for record in records:
        assert record.status == "finished", (record.spec.pair, record.spec.method, record.error)
    for record in runs:
        m = record.metrics
        assert m["iters_per_epoch"] == 2 and m["prepare_s"] > 0
        assert m["end_to_end_wall_s"] == pytest.approx(m["wall_s"] + m["prepare_s"] + m["reused_fit_s"]
                                                       + m["teacher_wall_s"])
        assert (m["reused_fit_s"] > 0) == (record.spec.method == "letkd2")  # letkd1 fitted the shared artefact
        assert m["extra_params_inference"] > 0
        assert m["extra_params_inference"] == m["inference_params"] - m["student_params"] == m["extra_params_train"]
        assert m["inference_macs"] > m["student_macs"]
        # the fit's run metrics: the recipe sets no cap, so every location of the 8 training images is clustered
        for kind, tap in (("penult", "pre_pool"), ("inter", "last_stage_first_block")):
            if kind == "penult" or record.spec.method == "letkd2":
                locations = 8 * math.prod(shapes(record.spec.student)[tap][1:])
                assert m[f"fit_locations_{kind}"] == m[f"fit_points_{kind}"] == locations and m[f"fit_s_{kind}"] > 0
            else:
                assert f"fit_points_{kind}" not in m
        epoch = record.epochs[0]
        assert all(math.isfinite(v) for v in epoch.values())
        assert epoch["loss_penult"] > 0 and "loss_kd" not in epoch
        assert ("loss_inter" in epoch) == (record.spec.method == "letkd2")
    # One artefact per (kind, student grid): letkd2 reused letkd1's penultimate fit; a 4x4 student of an 8x8
    # teacher has its own, pooled, artefacts.
    artefacts = [p.name.split("-")[1] for p in (env.store.run_dir(teacher_run.run_id) / "artefacts").iterdir()]
    grids = len({shapes(s)["pre_pool"][1:] for s in students})
    assert sorted(artefacts) == ["inter"] * grids + ["penult"] * grids
