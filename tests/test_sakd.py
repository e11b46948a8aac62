"""SAKD reconstruction (methods/sakd.py): the parameter-free uniformization against a hand computation, equal
lengths over the zoo, channel-permutation invariance, one function for teacher and student, gradients, loss terms
per ablation and protocol, the teacher-prefit head, and end-to-end runs of every ablation through the harness."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, method_context, tiny_sweep

from kdbench.errors import KdbenchError
from kdbench.harness import run_sweep
from kdbench.methods import method_class, sakd
from kdbench.methods.base import MethodContext, Preparation, StepOutputs
from kdbench.models import create_model, list_models
from kdbench.models.taps import feature_shapes, stage_names

SAKD = method_class("sakd")
Uniformization, SpatialEnergy = sakd.Uniformization, sakd.SpatialEnergy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run tiny ops; on a shared, busy CPU several intra-op threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zoo_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Feature shapes of every CIFAR zoo model, once; built on the meta device (shapes only, no memory, no init)."""
    with torch.device("meta"):
        return {name: feature_shapes(create_model(name), (3, 32, 32)) for name in list_models(input_size=32)}


def context(student, teacher, protocol="semckd", options=None, num_classes=100) -> MethodContext:
    return method_context("sakd", student, teacher, protocol, options, 8, num_classes)


# Small custom shapes: student resnet-like (stage3 8x8), teacher vgg-like (stage4 4x4), different channel counts.
S_SHAPES = {"stem": (4, 16, 16), "stage1": (4, 16, 16), "stage2": (8, 8, 8), "stage3": (16, 8, 8), "logits": (10,)}
T_SHAPES = {"stage1": (6, 16, 16), "stage2": (12, 8, 8), "stage3": (24, 4, 4), "stage4": (32, 4, 4),
            "logits": (10,)}


def step(method, batch=6, seed=0, num_classes=10, grad=True) -> StepOutputs:
    g = torch.Generator().manual_seed(seed)
    ctx = method.ctx

    def feats(shapes, taps):
        return {n: torch.randn(batch, *shapes[n], generator=g).relu().requires_grad_(grad) for n in taps}

    return StepOutputs(
        labels=torch.randint(0, num_classes, (batch,), generator=g),
        student_logits=torch.randn(batch, num_classes, generator=g).requires_grad_(grad),
        student_features=feats(ctx.student_shapes, method.student_taps),
        teacher_logits=torch.randn(batch, num_classes, generator=g),
        teacher_features=feats(ctx.teacher_shapes, method.teacher_taps),
    )


# ------------------------------------------------------------------------------------------------ U by hand (§6.2)


def softmax_rows(m: list[list[float]]) -> list[list[float]]:
    out = []
    for row in m:
        e = [math.exp(v) for v in row]
        out.append([v / sum(e) for v in e])
    return out


@pytest.mark.parametrize("tau_a", [1.0, 0.5])
def test_uniformization_matches_a_hand_computation(tau_a):
    # C = 2, 2x2 map; tokens in row-major order: (1,0), (0,2), (3,4), (4,3) -> L2-normalised rows
    f = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[0.0, 2.0], [4.0, 3.0]]])[None]
    rows = [(1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (0.8, 0.6)]
    gram = [[(a[0] * b[0] + a[1] * b[1]) / tau_a for b in rows] for a in rows]
    attention = softmax_rows(gram)
    u = Uniformization(tau_a=tau_a)(f, (2, 2))
    assert u.shape == (1, 16) and u.dtype == torch.float32
    torch.testing.assert_close(u, torch.tensor([sum(attention, [])]))
    colmean = Uniformization(tau_a=tau_a, vector="colmean")(f, (2, 2))
    torch.testing.assert_close(colmean, torch.tensor([[sum(r[j] for r in attention) / 4 for j in range(4)]]))
    # rows of A sum to 1: the entries of u average 1/N
    torch.testing.assert_close(u.view(4, 4).sum(1), torch.ones(4))


def test_row_norm_variants_by_hand():
    f = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[0.0, 2.0], [4.0, 3.0]]])[None]
    raw = [(1.0, 0.0), (0.0, 2.0), (3.0, 4.0), (4.0, 3.0)]
    # none: the raw dot products
    expect = softmax_rows([[a[0] * b[0] + a[1] * b[1] for b in raw] for a in raw])
    torch.testing.assert_close(Uniformization(row_norm="none")(f, (2, 2)), torch.tensor([sum(expect, [])]))
    # standardize over 2 channels: (x - mean) / std / sqrt(2) is ±1/sqrt(2) by sign of c0 - c1, so dots are ±1
    sign = [1.0, -1.0, -1.0, 1.0]
    expect = softmax_rows([[a * b for b in sign] for a in sign])
    torch.testing.assert_close(Uniformization(row_norm="standardize")(f, (2, 2)), torch.tensor([sum(expect, [])]))


def test_pooling_aligns_to_the_smaller_map_and_caps_at_p():
    f = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(sakd.pool_to(f, (2, 2)), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert sakd.pool_to(f, (4, 4)) is f
    with pytest.raises(ValueError):
        sakd.pool_to(f, (8, 8))
    assert sakd.aligned_size((64, 8, 8), (512, 4, 4), 8) == (4, 4)
    assert sakd.aligned_size((16, 32, 32), (32, 32, 32), 8) == (8, 8)
    assert sakd.aligned_size((16, 32, 32), (32, 16, 16), 4) == (4, 4)
    # U on a 4x4 map at size 2x2 is U on the pooled map
    g = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(Uniformization()(g, (2, 2)), Uniformization()(F.avg_pool2d(g, 2), (2, 2)))


def test_spatial_energy_by_hand():
    f = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[0.0, 2.0], [4.0, 3.0]]])[None]
    energy = torch.tensor([0.5, 2.0, 12.5, 12.5])  # mean over channels of F²
    torch.testing.assert_close(SpatialEnergy()(f, (2, 2)), (energy / energy.norm())[None])


# ------------------------------------------------------------------------------------------------ properties of U


@pytest.mark.parametrize("module", [Uniformization(), Uniformization("standardize", 0.5, "colmean"), SpatialEnergy()])
def test_uniformization_is_parameter_free(module):
    assert list(module.parameters()) == [] and list(module.buffers()) == [] and module.state_dict() == {}
    method = SAKD(context(S_SHAPES, T_SHAPES, num_classes=10))
    assert list(method.uniformize.parameters()) == [] and list(method.uniformize.buffers()) == []
    assert not any(k.startswith("uniformize") for k in method.state_dict())


def test_equal_lengths_for_every_ordered_zoo_pair(zoo_shapes):
    u = Uniformization()
    g = torch.Generator().manual_seed(0)
    inputs = {}  # one zero and one random map per distinct last-stage shape
    vectors = functools.lru_cache(maxsize=None)(lambda kind, shape, size: u(inputs[kind, shape], size))
    for shapes in zoo_shapes.values():
        shape = shapes[stage_names(shapes)[-1]]
        inputs["zero", shape], inputs["rand", shape] = torch.zeros(1, *shape), torch.rand(1, *shape, generator=g)
    lengths = set()
    for student, teacher in itertools.permutations(zoo_shapes, 2):
        s, t = zoo_shapes[student], zoo_shapes[teacher]
        ((s_tap, t_tap),) = sakd.stage_pairs("last", s, t)
        assert (s_tap, t_tap) == (stage_names(s)[-1], stage_names(t)[-1])
        size = sakd.aligned_size(s[s_tap], t[t_tap], 8)
        u_s = vectors("zero", s[s_tap], size)
        u_t = vectors("rand", t[t_tap], size)
        assert u_s.shape == u_t.shape == (1, u.length(size)), (student, teacher)
        lengths.add(u_s.shape[1])
    # 8x8 (ResNet/WRN pairs), 4x4 (VGG/ShuffleNet/ResNet50), 2x2 (MobileNetV2): N² = 4096, 256, 16
    assert lengths == {4096, 256, 16}


def test_method_vectors_have_equal_length_for_several_zoo_pairs(zoo_shapes):
    for student, teacher, length in [("resnet8", "resnet32x4", 4096), ("MobileNetV2", "ResNet50", 16),
                                     ("ShuffleV2", "wrn_40_2", 256), ("vgg8", "vgg13", 256)]:
        with torch.device("meta"):  # the head is Linear(N² -> 100): sizes only
            method = SAKD(context(zoo_shapes[student], zoo_shapes[teacher]))
        assert method.vector_length == length and method.head.in_features == length
        out = step(method, batch=2, num_classes=100, grad=False)
        assert method.student_vector(out.student_features).shape == (2, length)
        assert method.teacher_vector(out.teacher_features).shape == (2, length)


@pytest.mark.parametrize("module", [Uniformization(), Uniformization("standardize", 0.5, "colmean"),
                                    Uniformization("none", 2.0), SpatialEnergy()])
def test_invariant_to_channel_permutation(module):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, 24, 8, 8, generator=g)
    perm = torch.randperm(24, generator=g)
    assert not torch.equal(perm, torch.arange(24))
    torch.testing.assert_close(module(f[:, perm], (4, 4)), module(f, (4, 4)))


def test_teacher_and_student_use_the_same_function():
    shapes_s = {"stage1": (16, 8, 8)}
    shapes_t = {"stage1": (4, 8, 8), "stage2": (16, 8, 8)}  # student stage1 and teacher stage2 share a shape
    method = SAKD(context(shapes_s, shapes_t, num_classes=10))
    assert (method.student_taps, method.teacher_taps) == (("stage1",), ("stage2",))
    calls = []
    method.uniformize.register_forward_hook(lambda mod, args, out: calls.append(mod))
    f = torch.randn(2, 16, 8, 8)
    u_s = method.student_vector({"stage1": f})
    u_t = method.teacher_vector({"stage2": f})
    assert calls == [method.uniformize, method.uniformize]  # one module for both networks
    assert torch.equal(u_s, u_t) and torch.equal(u_s, Uniformization()(f, (8, 8)))


def test_vector_is_fp32_under_autocast():
    method = SAKD(context(S_SHAPES, T_SHAPES, num_classes=10))
    out = step(method, grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = {k: v.bfloat16() for k, v in out.student_features.items()}
        u = method.student_vector(bf16)
        assert u.dtype == torch.float32 and method.head_logits(u).dtype == torch.float32
        terms = method.losses(out)
    assert all(t.dtype == torch.float32 for t in terms.values())


# ------------------------------------------------------------------------------------------------ stages and options


def test_stage_selection():
    assert sakd.stage_pairs("last", S_SHAPES, T_SHAPES) == [("stage3", "stage4")]
    assert sakd.stage_pairs("all", S_SHAPES, T_SHAPES) == [("stage1", "stage2"), ("stage2", "stage3"),
                                                           ("stage3", "stage4")]
    assert sakd.stage_pairs("2,3", S_SHAPES, T_SHAPES) == [("stage2", "stage2"), ("stage3", "stage3")]
    assert sakd.stage_pairs("-2", S_SHAPES, T_SHAPES) == [("stage2", "stage3")]
    for bad in ("4", "0", "first", "3,3"):
        with pytest.raises(KdbenchError, match="sakd.stages"):
            sakd.stage_pairs(bad, S_SHAPES, T_SHAPES)
    # several stages: their vectors concatenate (stage2 pair aligned at 8x8, stage3 pair at 4x4)
    method = SAKD(context(S_SHAPES, T_SHAPES, options={"stages": "2,3"}, num_classes=10))
    assert method.sizes == [(8, 8), (4, 4)] and method.vector_length == 64 * 64 + 16 * 16
    out = step(method, grad=False)
    assert method.student_vector(out.student_features).shape == (6, 64 * 64 + 16 * 16)
    assert set(method.losses(out)) == {"ce", "kd", "sakd_kl", "sakd_ce"}


def test_options_resolve_and_validate():
    opts = dict(SAKD.resolve_options({"components": "branch", "pool_size": "4", "tau_a": "0.5",
                                      "head_mode": "joint"}))
    assert opts["components"] == "branch" and opts["pool_size"] == 4 and opts["tau_a"] == 0.5
    assert dict(SAKD.resolve_options({}))["head_mode"] == "prefit_teacher"
    with pytest.raises(KdbenchError, match="components"):
        SAKD.resolve_options({"components": "neither"})
    with pytest.raises(KdbenchError, match="delta"):
        SAKD(context(S_SHAPES, T_SHAPES, options={"components": "branch", "delta": 1.0}))
    with pytest.raises(KdbenchError, match="tau_a"):
        SAKD(context(S_SHAPES, T_SHAPES, options={"tau_a": 0.0}))
    small = SAKD(context(S_SHAPES, T_SHAPES, options={"pool_size": 2, "vector": "colmean", "head": "mlp"},
                         num_classes=10))
    assert small.sizes == [(2, 2)] and small.vector_length == 4
    assert [m.in_features for m in small.head if isinstance(m, torch.nn.Linear)] == [4, 512]


# ------------------------------------------------------------------------------------------------ losses (§6.4)


@pytest.mark.parametrize("protocol", ["semckd", "crd"])
@pytest.mark.parametrize("components, head_mode, keys", [
    ("both", "prefit_teacher", {"sakd_kl", "sakd_ce"}),
    ("both", "joint", {"sakd_kl", "sakd_ce", "sakd_head_ce"}),
    ("uniformization", "prefit_teacher", {"sakd_mse"}),
    ("branch", "prefit_teacher", {"branch_kl", "branch_ce"}),
    ("branch", "joint", {"branch_kl", "branch_ce", "branch_head_ce"}),
])
def test_loss_terms_per_ablation_and_protocol(protocol, components, head_mode, keys):
    method = SAKD(context(S_SHAPES, T_SHAPES, protocol, {"components": components, "head_mode": head_mode}, 10))
    terms = method.losses(step(method))
    logit = {"ce", "kd"} if protocol == "semckd" else {"ce"}
    assert set(terms) == logit | keys
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    assert (method.head is None) == (components == "uniformization")


def test_delta_adds_feature_matching_to_both():
    method = SAKD(context(S_SHAPES, T_SHAPES, "crd", {"delta": 2.0}, 10))
    assert set(method.losses(step(method))) == {"ce", "sakd_kl", "sakd_ce", "sakd_mse"}
    assert SAKD(context(S_SHAPES, T_SHAPES, options={"components": "uniformization"})).delta == 1.0
    assert SAKD(context(S_SHAPES, T_SHAPES, options={"components": "uniformization", "delta": 3.0})).delta == 3.0


def test_loss_matches_a_hand_computation():
    opts = {"beta": 2.0, "gamma": 0.5, "delta": 3.0, "tau_b": 2.0}
    method = SAKD(context(S_SHAPES, T_SHAPES, "semckd", opts, 10))
    out = step(method, grad=False)
    terms = method.losses(out)
    u = Uniformization()
    u_s = u(F.adaptive_avg_pool2d(out.student_features["stage3"], (4, 4)), (4, 4))  # 8x8 student -> 4x4
    u_t = u(out.teacher_features["stage4"], (4, 4))
    z_s, z_t = method.head(16 * u_s), method.head(16 * u_t)  # head input scaled by N = 16
    p_s, p_t = F.softmax(z_s / 2, dim=1), F.softmax(z_t / 2, dim=1)
    kl = 4 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    ce_branch = -F.log_softmax(z_s, dim=1)[torch.arange(6), out.labels].mean()
    torch.testing.assert_close(terms["sakd_kl"], 2.0 * kl)
    torch.testing.assert_close(terms["sakd_ce"], 0.5 * ce_branch)
    torch.testing.assert_close(terms["sakd_mse"], 3.0 * (u_s - u_t).pow(2).mean())
    torch.testing.assert_close(terms["ce"], F.cross_entropy(out.student_logits, out.labels))
    p_s, p_t = (F.softmax(z / 4, dim=1) for z in (out.student_logits, out.teacher_logits))
    torch.testing.assert_close(terms["kd"], 16 * (p_t * (p_t.log() - p_s.log())).sum(1).mean())


@pytest.mark.parametrize("components", ["both", "uniformization", "branch"])
@pytest.mark.parametrize("head_mode", ["prefit_teacher", "joint"])
def test_gradient_reaches_the_student_never_the_teacher(components, head_mode):
    method = SAKD(context(S_SHAPES, T_SHAPES, "crd", {"components": components, "head_mode": head_mode}, 10))
    out = step(method)  # teacher features carry requires_grad too: U must detach them
    terms = method.losses(out)
    sum(v for k, v in terms.items() if k != "ce").backward()  # the distillation terms alone
    (f_s,) = out.student_features.values()
    (f_t,) = out.teacher_features.values()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    if method.head is not None:
        trained = [p.grad is not None for p in method.head.parameters()]
        assert all(trained) if head_mode == "joint" else not any(trained)


# ------------------------------------------------------------------------------------------------ the head (§6.3)


def fake_preparation(num_classes=3, batches=4, batch=16):
    """A tiny random frozen 'teacher' whose stage2 (16 x 4 x 4) depends on the class, and a few batches."""
    g = torch.Generator().manual_seed(7)
    conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1).requires_grad_(False)
    templates = 2 * torch.randn(num_classes, 3, 8, 8, generator=g)
    data = []
    for _ in range(batches):
        y = torch.randint(0, num_classes, (batch,), generator=g)
        data.append((templates[y] + torch.randn(batch, 3, 8, 8, generator=g), y))

    @torch.no_grad()
    def teacher(x):
        f = conv(x).relu()
        return f.mean((2, 3))[:, :num_classes], {"stage2": f}

    return Preparation(teacher, lambda index: iter(data), lambda: iter(data), cache_dir=None,
                       device=torch.device("cpu"))


PREP_S = {"stage1": (4, 8, 8), "stage2": (8, 4, 4)}
PREP_T = {"stage1": (8, 8, 8), "stage2": (16, 4, 4)}


def test_prefit_fits_then_freezes_the_head():
    torch.manual_seed(0)
    method = SAKD(context(PREP_S, PREP_T, "crd", {"prefit_passes": 8, "prefit_lr": 0.05}, 3))
    assert not any(p.requires_grad for p in method.head.parameters())  # frozen from construction (resume)
    assert method.extra_params_train() == 0 and method.extra_params_inference() == 0
    before = {k: v.clone() for k, v in method.head.state_dict().items()}
    prep = fake_preparation()
    method.prepare(prep)
    assert not any(p.requires_grad for p in method.head.parameters())
    assert all(p.grad is None for p in method.head.parameters())
    assert all(not torch.equal(before[k], v) for k, v in method.head.state_dict().items())
    assert len(method.prefit_history) == 8 and method.prefit_history[-1] < method.prefit_history[0]
    assert set(method.state_dict()) == {"head.weight", "head.bias"}  # what prepare fitted is in the state_dict
    # the fitted head reads the teacher's classes from u_T
    x, y = next(prep.train_batches(0))
    _, feats = prep.teacher(x)
    logits = method.head_logits(method.teacher_vector(feats))
    assert (logits.argmax(1) == y).float().mean() > 0.5
    assert method.extra_params_train() == 0


def test_joint_head_is_trainable_and_prepare_leaves_it():
    method = SAKD(context(PREP_S, PREP_T, "crd", {"head_mode": "joint"}, 3))
    before = {k: v.clone() for k, v in method.head.state_dict().items()}
    method.prepare(fake_preparation())
    assert all(p.requires_grad for p in method.head.parameters())
    assert all(torch.equal(before[k], v) for k, v in method.head.state_dict().items())
    assert method.extra_params_train() == 16 * 16 * 3 + 3 and method.extra_params_inference() == 0


def test_uniformization_only_has_nothing_to_prepare_or_count():
    method = SAKD(context(PREP_S, PREP_T, "crd", {"components": "uniformization"}, 3))
    method.prepare(fake_preparation())
    assert method.head is None and method.state_dict() == {}
    assert method.extra_params_train() == 0 and method.extra_params_inference() == 0


# ------------------------------------------------------------------------------------------------ end to end


def test_every_ablation_end_to_end_through_the_harness(env):
    # CPU-sized: one epoch of a fixed 128-image subset (4 steps of 32), 64 test images, one prefit pass
    recipe = TINY.overridden(epochs=1, train_subset=128, test_subset=64)
    plain = create_model("resnet8", num_classes=10)
    plain_params = sum(p.numel() for p in plain.parameters())
    expected = {"both": {"sakd_kl", "sakd_ce"}, "uniformization": {"sakd_mse"},
                "branch": {"branch_kl", "branch_ce"}}
    for components, keys in expected.items():
        sweep = tiny_sweep(methods=("sakd",), pair=("resnet14", "resnet8"), recipe=recipe,
                           method_options=(("sakd", "components", components), ("sakd", "prefit_passes", "1")))
        records = run_sweep(sweep.plan(), env)  # the teacher trains once, in the first sweep
        assert [r.status for r in records] == ["finished", "finished"], [r.error for r in records]
        student = records[1]
        assert dict(student.spec.method_options)["components"] == components
        m = student.metrics
        assert "prepare_s" in m
        if components != "uniformization":  # prefit_teacher (the default) fits the head before training
            assert m["prepare_s"] > 0
        assert m["extra_params_inference"] == 0 and m["extra_params_train"] == 0  # prefit head is frozen
        assert m["student_params"] == plain_params
        (epoch,) = student.epochs
        # the default (official) protocol: the reconstruction's crd form, no logit KD
        assert {k[len("loss_"):] for k in epoch if k.startswith("loss_")} == {"ce"} | keys
        assert all(math.isfinite(epoch[f"loss_{k}"]) for k in keys)
        weights = torch.load(env.store.weights_path(student.run_id), weights_only=True)
        assert set(weights) == set(plain.state_dict())  # the branch is not in the exported student
        plain.load_state_dict(weights)
