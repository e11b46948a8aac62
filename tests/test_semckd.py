"""SemCKD (methods/semckd.py): module sizes, attention, the loss against a hand computation, gradients,
protocols and options, and an end-to-end run through the harness."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, method_context, tiny_sweep

from kdbench.harness import RunEnv, run_sweep, sha256_file
from kdbench.methods import method_class
from kdbench.methods.base import MethodContext, StepOutputs
from kdbench.models import create_model
from kdbench.models.taps import feature_shapes

SemCKD = method_class("semckd")


@functools.lru_cache(maxsize=None)
def shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return feature_shapes(create_model(arch), (3, 32, 32))


def context(student, teacher, batch_size=64, protocol="semckd", options=None) -> MethodContext:
    s = shapes(student) if isinstance(student, str) else student
    t = shapes(teacher) if isinstance(teacher, str) else teacher
    return method_context("semckd", s, t, protocol, options, batch_size)


def features(tap_shapes, taps, batch, seed, requires_grad=False):
    # Gaussian, not post-ReLU-like: with all-positive maps every Gram entry is large and positive, and at B = 8
    # (4 hidden units per MLP) a key MLP can be dead for the whole batch, which would hide its gradient.
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, *tap_shapes[n], generator=g).requires_grad_(requires_grad) for n in taps}


def step(method, batch, seed=0, requires_grad=True, num_classes=100):
    g = torch.Generator().manual_seed(seed + 1000)
    return StepOutputs(
        labels=torch.randint(0, num_classes, (batch,), generator=g),
        student_logits=torch.randn(batch, num_classes, generator=g).requires_grad_(requires_grad),
        student_features=features(method.ctx.student_shapes, method.student_taps, batch, seed, requires_grad),
        teacher_logits=torch.randn(batch, num_classes, generator=g),
        teacher_features=features(method.ctx.teacher_shapes, method.teacher_taps, batch, seed + 1),
    )


def mlp_params(method) -> int:
    return sum(p.numel() for n, p in method.named_parameters() if n.startswith(("query_weight", "key_weight")))


# ------------------------------------------------------------------------------------------------ sizes (§3.6)


def test_vgg13_vgg8_extra_params_match_cost_table():
    method = SemCKD(context("vgg8", "vgg13"))  # a real (not meta) build: ~96 M parameters, once
    assert method.student_taps == method.teacher_taps == ("stage1", "stage2", "stage3", "stage4")
    assert method.extra_params_train() == pytest.approx(96.17e6, abs=0.005e6)
    assert mlp_params(method) == 20_864
    assert method.extra_params_inference() == 0
    # the only buffers are the regressors' BatchNorm statistics (the attention diagnostic is not one)
    assert {n.rsplit(".", 1)[-1] for n, _ in method.named_buffers()} == {"running_mean", "running_var",
                                                                       "num_batches_tracked"}


@pytest.mark.parametrize("teacher, student, millions", [
    ("resnet56", "resnet20", 0.66), ("resnet32x4", "resnet8x4", 10.23), ("wrn_40_2", "wrn_16_2", 2.57),
    ("wrn_40_2", "wrn_40_1", 2.52), ("resnet32x4", "ShuffleV1", 11.34), ("resnet32x4", "ShuffleV2", 10.56),
    ("wrn_40_2", "ShuffleV1", 3.23), ("vgg13", "MobileNetV2", 92.87), ("ResNet50", "MobileNetV2", 848.68),
    ("ResNet50", "vgg8", 857.68),
])
def test_extra_params_match_cost_table(teacher, student, millions):
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        method = SemCKD(context(student, teacher))
    assert method.extra_params_train() == pytest.approx(millions * 1e6, abs=0.005e6)
    layers = len(method.student_taps), len(method.teacher_taps)
    assert mlp_params(method) == {(3, 3): 15_648, (4, 4): 20_864}[layers]
    # the per-regressor formula of §3.3: 2·C_t·C_s + 4C_t + 9·(2C_t)² + 4C_t + 2C_t·C_t
    c_s = [shapes(student)[n][0] for n in method.student_taps]
    c_t = [shapes(teacher)[n][0] for n in method.teacher_taps]
    formula = sum(2 * t * s + 8 * t + 9 * (2 * t) ** 2 + 2 * t * t for s in c_s for t in c_t)
    assert method.extra_params_train() - mlp_params(method) == formula


def test_module_names_and_mlp_shapes_follow_the_official_code():
    with torch.device("meta"):
        method = SemCKD(context("resnet20", "resnet56"))
    names = {n for n, _ in method.named_children()}
    assert names == {"key_weight0", "key_weight1", "key_weight2", "query_weight0", "query_weight1", "query_weight2",
                     *(f"regressor{i}{j}" for i in range(3) for j in range(3))}
    assert tuple(method.query_weight0.linear1.weight.shape) == (32, 64)  # B = 64 -> 32 -> 16
    assert tuple(method.key_weight2.linear2.weight.shape) == (16, 32)
    convs = [m for m in method.regressor12.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)] and all(c.bias is None for c in convs)
    assert (convs[0].in_channels, convs[0].out_channels, convs[2].out_channels) == (32, 128, 64)  # C_s=32, C_t=64
    # state-dict keys as in SemCKD's `SelfA` (so its `attention` checkpoints load)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert set(method.regressor12.state_dict()) == {"regressor.0.weight", "regressor.3.weight", "regressor.6.weight",
                                                    *(f"regressor.{k}.{b}" for k in (1, 4) for b in bn)}
    assert set(method.key_weight0.state_dict()) == {f"linear{k}.{w}" for k in (1, 2) for w in ("weight", "bias")}


def test_taps_are_the_stage_outputs_sorted_by_number():
    s = {"stem": (2, 4, 4), "stage10": (2, 1, 1), "stage2": (2, 2, 2), "stage1": (2, 4, 4),
         "stage1_preact": (2, 4, 4), "pooled": (2,), "logits": (10,)}
    method = SemCKD(context(s, {"stage1": (2, 4, 4), "stage2_preact": (2, 2, 2)}, batch_size=8))
    assert method.student_taps == ("stage1", "stage2", "stage10") and method.teacher_taps == ("stage1",)


def test_parameter_count_grows_with_batch_size():
    a = SemCKD(context("resnet8", "resnet14", batch_size=64))
    b = SemCKD(context("resnet8", "resnet14", batch_size=128))
    # per MLP: B·B/2 + B/2 + B/2·B/4 + B/4 weights and biases, 6 MLPs
    per_mlp = {bs: bs * bs // 2 + bs // 2 + bs * bs // 8 + bs // 4 for bs in (64, 128)}
    assert mlp_params(a) == 6 * per_mlp[64] and mlp_params(b) == 6 * per_mlp[128]
    assert b.extra_params_train() - a.extra_params_train() == 6 * (per_mlp[128] - per_mlp[64])


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("teacher, student, s_layers, t_layers", [
    ("vgg8", "resnet8", 3, 4), ("resnet8", "MobileNetV2", 4, 3), ("resnet32x4", "ShuffleV2", 3, 3),
])
def test_attention_is_a_softmax_over_teacher_layers(teacher, student, s_layers, t_layers):
    torch.manual_seed(0)
    method = SemCKD(context(student, teacher, batch_size=8))
    out = step(method, 8)
    terms = method.losses(out)
    assert torch.isfinite(terms["semckd"]) and terms["semckd"] > 0
    feat_s = [out.student_features[n] for n in method.student_taps]
    feat_t = [out.teacher_features[n] for n in method.teacher_taps]
    attention = method.attention(feat_s, feat_t)
    assert attention.shape == (8, s_layers, t_layers)
    torch.testing.assert_close(attention.sum(-1), torch.ones(8, s_layers))
    assert (attention > 0).all()
    # the diagnostic: last batch's mean attention, a plain attribute (not a buffer, not a parameter)
    assert method.mean_attention.shape == (s_layers, t_layers) and not method.mean_attention.requires_grad
    torch.testing.assert_close(method.mean_attention, attention.detach().mean(0))
    assert "mean_attention" not in method.state_dict()
    assert method.extra_params_train() == sum(p.numel() for p in method.parameters())
    assert method.pair_losses(feat_s, feat_t).shape == (8, s_layers, t_layers)


# ------------------------------------------------------------------------------------------------ the loss (§3.4)


def test_loss_matches_a_hand_computation():
    batch = 8  # MLP embedding width 2
    student = {"stage1": (2, 4, 4), "stage2": (3, 2, 2), "stage3": (4, 2, 2)}
    teacher = {"stage1": (2, 4, 4), "stage2": (5, 2, 2)}
    torch.manual_seed(0)
    method = SemCKD(context(student, teacher, batch_size=batch, protocol="crd"))
    out = step(method, batch, requires_grad=False, num_classes=10)
    terms = method.losses(out)

    fs = [out.student_features[f"stage{i + 1}"] for i in range(3)]
    ft = [out.teacher_features[f"stage{j + 1}"] for j in range(2)]

    def embed(mlp, f):
        q = f.reshape(batch, -1)
        h = torch.relu(q @ q.T @ mlp.linear1.weight.T + mlp.linear1.bias) @ mlp.linear2.weight.T + mlp.linear2.bias
        return h / h.norm(dim=1, keepdim=True)

    def pool2(x):  # 4x4 -> 2x2 average pooling, by hand
        return x.reshape(*x.shape[:2], 2, 2, 2, 2).mean(dim=(3, 5))

    q = [embed(getattr(method, f"query_weight{i}"), fs[i]) for i in range(3)]
    k = [embed(getattr(method, f"key_weight{j}"), ft[j]) for j in range(2)]
    total = torch.zeros(())
    for b in range(batch):
        for i in range(3):
            e = torch.stack([q[i][b] @ k[j][b] for j in range(2)])
            a = torch.exp(e) / torch.exp(e).sum()
            for j in range(2):
                h_s, h_t = fs[i].shape[-1], ft[j].shape[-1]
                if h_s > h_t:  # student 4x4 vs teacher 2x2: pool the student, then regress
                    value, target = method.regressor(i, j)(pool2(fs[i]))[b], ft[j][b]
                elif h_s < h_t:  # student 2x2 vs teacher 4x4: regress at 2x2, pool the teacher
                    value, target = method.regressor(i, j)(fs[i])[b], pool2(ft[j])[b]
                else:
                    value, target = method.regressor(i, j)(fs[i])[b], ft[j][b]
                assert value.shape == target.shape == (teacher[f"stage{j + 1}"][0], min(h_s, h_t), min(h_s, h_t))
                total = total + a[j] * ((value - target) ** 2).mean()
    expected = total / (batch * 3)  # divided by B·S (S = 3 student layers), not B·T
    assert set(terms) == {"ce", "semckd"}
    torch.testing.assert_close(terms["semckd"], 400.0 * expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(out.student_logits, out.labels))


def test_loss_is_in_fp32_under_autocast():
    torch.manual_seed(0)
    method = SemCKD(context("resnet8", "resnet14", batch_size=8))
    out = step(method, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.losses(out)
        feat_s = [out.student_features[n] for n in method.student_taps]
        feat_t = [out.teacher_features[n] for n in method.teacher_taps]
        attention = method.attention(feat_s, feat_t)
    assert terms["semckd"].dtype == torch.float32 and attention.dtype == torch.float32
    assert torch.isfinite(terms["semckd"])


# ------------------------------------------------------------------------------------------------ gradients


def test_gradient_flows_through_value_and_query_paths_not_into_the_teacher():
    torch.manual_seed(0)
    method = SemCKD(context("vgg8", "resnet8", batch_size=8))
    out = step(method, 8)
    feat_s = [out.student_features[n] for n in method.student_taps]
    feat_t = [out.teacher_features[n] for n in method.teacher_taps]

    # query path alone: a fixed weighting of the attention
    weights = torch.rand(8, len(feat_s), len(feat_t), generator=torch.Generator().manual_seed(3))
    query_grads = torch.autograd.grad((method.attention(feat_s, feat_t) * weights).sum(), feat_s)
    assert all(g is not None and g.abs().sum() > 0 for g in query_grads)
    # value path alone: the per-pair MSEs
    value_grads = torch.autograd.grad(method.pair_losses(feat_s, feat_t).sum(), feat_s)
    assert all(g.abs().sum() > 0 for g in value_grads)

    # the full term reaches the student features and every auxiliary module
    method.zero_grad()
    method.losses(out)["semckd"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feat_s)
    assert all(f.grad is None and not f.requires_grad for f in feat_t)
    for prefix in ("query_weight", "key_weight", "regressor"):
        params = {n: p for n, p in method.named_parameters() if n.startswith(prefix)}
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values()), prefix


def test_teacher_features_with_grad_are_detached():
    torch.manual_seed(0)
    method = SemCKD(context("resnet8", "resnet14", batch_size=8))
    out = step(method, 8)
    for f in out.teacher_features.values():
        f.requires_grad_(True)
    method.losses(out)["semckd"].backward()
    assert all(f.grad is None for f in out.teacher_features.values())


# ------------------------------------------------------------------------------------------------ protocol, options


def test_protocol_decides_the_logit_terms():
    for protocol, keys in (("crd", {"ce", "semckd"}), ("semckd", {"ce", "kd", "semckd"})):
        torch.manual_seed(0)
        method = SemCKD(context("resnet8", "resnet14", batch_size=8, protocol=protocol))
        assert set(method.losses(step(method, 8))) == keys


def test_beta_option_scales_the_term_linearly():
    options = dict(SemCKD.resolve_options({"beta": "100"}))
    assert options["beta"] == 100.0 and isinstance(options["beta"], float)
    assert dict(SemCKD.resolve_options({}))["beta"] == 400.0
    terms = {}
    for beta, opts in ((400.0, {}), (100.0, {"beta": "100"})):
        torch.manual_seed(0)
        method = SemCKD(context("resnet8", "resnet14", batch_size=8, options=opts))
        assert method.beta == beta
        terms[beta] = method.losses(step(method, 8))
    torch.testing.assert_close(terms[100.0]["semckd"] * 4, terms[400.0]["semckd"])
    torch.testing.assert_close(terms[100.0]["kd"], terms[400.0]["kd"])


# ------------------------------------------------------------------------------------------------ misuse


def test_wrong_batch_size_raises():
    torch.manual_seed(0)
    method = SemCKD(context("resnet8", "resnet14", batch_size=8))
    with pytest.raises(ValueError, match="exactly 8"):
        method.losses(step(method, 6))
    with pytest.raises(ValueError, match="batch size of at least 4"):
        SemCKD(context("resnet8", "resnet14", batch_size=2))
    with pytest.raises(ValueError, match="needs a teacher"):
        SemCKD(MethodContext(shapes("resnet8"), None, "semckd", 8, 100))
    assert SemCKD.needs_full_batches and SemCKD.needs_teacher


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_end_to_end_through_the_harness(env):
    # beta = 50 via `--set semckd.beta=50`: at the default 400 and the student's lr 0.05 this tiny synthetic run
    # diverges (non-finite loss) within ~12 steps; the run's recipe is otherwise the conftest TINY one.
    sweep = tiny_sweep(methods=("semckd",), pair=("resnet14", "resnet8"), method_options=(("semckd", "beta", "50"),))
    plan = sweep.plan()
    (teacher,) = run_sweep(plan[:1], env)
    weights = env.store.weights_path(teacher.run_id)
    before = weights.read_bytes()
    records = run_sweep(plan, env)
    assert [r.status for r in records] == ["finished", "finished"], [r.error for r in records]
    student = records[1]
    assert student.spec.method == "semckd" and student.spec.teacher_run == teacher.run_id
    assert dict(student.spec.method_options) == {"beta": 50.0, "ce_weight": 1.0, "kd_weight": 1.0,
                                                 "temperature": 4.0, "kl_reduction": "batchmean"}
    rows = student.tidy()
    assert set(rows.method_overrides) == {"beta=50.0"} and set(records[0].tidy().method_overrides) == {""}
    m = student.metrics
    assert m["extra_params_train"] > 0 and m["extra_params_inference"] == 0
    assert m["dropped_images_per_epoch"] == 0 and m["iters_per_epoch"] == 640 // 32
    assert len(student.epochs) == 3
    for epoch in student.epochs:
        assert {"loss_ce", "loss_kd", "loss_semckd"} <= set(epoch)
        assert math.isfinite(epoch["loss_semckd"]) and epoch["loss_semckd"] > 0
    assert weights.read_bytes() == before  # the frozen teacher is never written

    # A batch that does not divide the 640 images: the partial last batch is dropped. The teacher is the one
    # trained above, imported as a checkpoint (no second teacher training); one epoch is enough here.
    digest = sha256_file(weights)
    imported = RunEnv(env.store, progress=False, checkpoints={digest: weights})
    recipe = TINY.overridden(batch_size=48, epochs=1)
    sweep = tiny_sweep(methods=("semckd",), recipe=recipe, teacher_ckpt_sha256=digest,
                       method_options=(("semckd", "beta", "50"),))
    records = run_sweep(sweep.plan(), imported)
    assert [r.status for r in records] == ["finished", "finished"], [r.error for r in records]
    m = records[1].metrics
    assert m["dropped_images_per_epoch"] == 640 % 48 == 16 and m["iters_per_epoch"] == 640 // 48
    assert math.isfinite(records[1].epochs[0]["loss_semckd"])
    assert weights.read_bytes() == before
