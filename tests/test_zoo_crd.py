"""CRD (methods/crd.py): the loss and the memory update against hand computations, the negatives' sampling,
Z and the step counter across a simulated resume, gradients, sizes, every reference pair, presets, and an
interrupted run through the harness that resumes to the same history."""

import functools
import math
import shutil

import pytest
import torch
from conftest import method_context, run_interrupted, tiny_sweep

from kdbench.errors import KdbenchError
from kdbench.harness import run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import Preparation, StepOutputs
from kdbench.models import create_model
from kdbench.models.taps import feature_shapes
from kdbench.spec import Recipe

CRD = method_class("crd")
REFERENCE_PAIRS = [("vgg13", "vgg8"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
                   ("resnet56", "resnet20"), ("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2")]


@functools.lru_cache(maxsize=None)
def shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return feature_shapes(create_model(arch, num_classes=100), (3, 32, 32))


def build(student=(3,), teacher=(5,), protocol="crd", options=None, num_train=8, seed=0, labels=None):
    """A CRD; tuples are pooled widths of made-up models; prepared with ``labels`` when given."""
    s = shapes(student) if isinstance(student, str) else {"pooled": student}
    t = shapes(teacher) if isinstance(teacher, str) else {"pooled": teacher}
    method = CRD(method_context("crd", s, t, protocol, options, batch_size=4, num_train=num_train, seed=seed))
    if labels is not None:
        method.prepare(Preparation(None, None, None, None, torch.device("cpu"), train_labels=labels))
    return method


def outputs(method, index, epoch=0, seed=0, requires_grad=False, num_classes=100):
    g = torch.Generator().manual_seed(seed)
    batch = len(index)
    width_s, width_t = method.ctx.student_shapes["pooled"], method.ctx.teacher_shapes["pooled"]
    return StepOutputs(
        labels=method.train_labels[index].clone(),
        student_logits=torch.randn(batch, num_classes, generator=g).requires_grad_(requires_grad),
        student_features={"pooled": torch.randn(batch, *width_s, generator=g).relu().requires_grad_(requires_grad)},
        teacher_logits=torch.randn(batch, num_classes, generator=g),
        teacher_features={"pooled": torch.randn(batch, *width_t, generator=g).relu().requires_grad_(requires_grad)},
        epoch=epoch, indices=torch.as_tensor(index, dtype=torch.long))


LABELS8 = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


# ------------------------------------------------------------------------------------------------ hand computations


def hand_embed(embed, x):
    """``W x + b`` then divided by its norm, in float64 lists."""
    w, b = embed.linear.weight.double().tolist(), embed.linear.bias.double().tolist()
    rows = []
    for sample in x.double().tolist():
        y = [sum(wi * xi for wi, xi in zip(w_row, sample)) + bj for w_row, bj in zip(w, b)]
        norm = math.sqrt(sum(v * v for v in y))
        rows.append([v / norm for v in y])
    return rows


def hand_side(anchors, bank, contrast, tau, z=None):
    """``exp(⟨bank[i], v⟩/τ)`` per anchor and contrast position; Z = mean·N when not given; the NCE loss."""
    n = len(bank)
    e = [[math.exp(sum(a * m for a, m in zip(v, bank[i])) / tau) for i in row] for v, row in zip(anchors, contrast)]
    if z is None:
        z = sum(map(sum, e)) / sum(map(len, e)) * n
    k, noise, eps = len(contrast[0]) - 1, 1 / n, 1e-7
    total = 0.0
    for row in e:
        p = [x / z for x in row]
        total += math.log(p[0] / (p[0] + k * noise + eps))
        total += sum(math.log(k * noise / (q + k * noise + eps)) for q in p[1:])
    return -total / len(e), z


def hand_update(bank, index, v, m):
    bank = [list(r) for r in bank]
    for i, row in zip(index, v):
        new = [m * a + (1 - m) * b for a, b in zip(bank[i], row)]
        norm = math.sqrt(sum(x * x for x in new))
        bank[i] = [x / norm for x in new]
    return bank


def test_loss_and_memory_match_a_hand_computation_over_two_steps():
    torch.manual_seed(0)
    method = build(options={"feat_dim": 4, "nce_k": 3}, labels=LABELS8)
    assert method.num_negatives == 3 and method.params[0] == 3  # 6 other-class positions, K = 3 asked
    tau, m = 0.07, 0.5
    bank_s, bank_t = method.memory_v1.double().tolist(), method.memory_v2.double().tolist()
    z = (None, None)
    for step, index in enumerate(([1, 4, 6], [0, 2, 7])):
        out = outputs(method, index, epoch=0, seed=step)
        negatives = method.negatives(out.indices, 0, step).tolist()  # a pure function: the draw losses() makes
        contrast = [[i, *row] for i, row in zip(index, negatives)]
        v_s = hand_embed(method.embed_s, out.student_features["pooled"])
        v_t = hand_embed(method.embed_t, out.teacher_features["pooled"])
        loss_s, z_s = hand_side(v_s, bank_t, contrast, tau, z[0])  # student anchor vs teacher memory (P_s, Z_v1)
        loss_t, z_t = hand_side(v_t, bank_s, contrast, tau, z[1])  # teacher anchor vs student memory (P_t, Z_v2)
        terms = method.losses(out)
        assert set(terms) == {"ce", "crd"}  # crd protocol: no logit KD
        assert terms["crd"].item() == pytest.approx(0.8 * (loss_s + loss_t), rel=1e-5)
        z = (z_s, z_t)  # set on the first batch, then frozen
        assert method.params[2:4].tolist() == pytest.approx([z_s, z_t], rel=1e-5)
        bank_s, bank_t = hand_update(bank_s, index, v_s, m), hand_update(bank_t, index, v_t, m)
        torch.testing.assert_close(method.memory_v1.double(), torch.tensor(bank_s, dtype=torch.float64))
        torch.testing.assert_close(method.memory_v2.double(), torch.tensor(bank_t, dtype=torch.float64))
    assert method.steps == 2 and method.steps_taken == 2


@pytest.mark.parametrize("momentum", [0.5, 0.25])
def test_memory_update_on_a_hand_example(momentum):
    method = build(options={"feat_dim": 2, "nce_m": momentum}, num_train=3)
    start = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    method.memory_v1.copy_(start)
    method.memory_v2.copy_(start.flip(1))
    v = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    method.update_memory(torch.tensor([0, 2]), v, v)
    r = 1 - momentum
    row0, row2 = torch.tensor([momentum, r]), torch.tensor([0.6 * momentum + r, 0.8 * momentum])
    expected = torch.stack([row0 / row0.norm(), start[1], row2 / row2.norm()])
    torch.testing.assert_close(method.memory_v1, expected)
    if momentum == 0.5:  # written out: [1, 0]·½ + [0, 1]·½ -> [1, 1]/√2; [.6, .8]·½ + [1, 0]·½ -> [.8, .4]/√.8
        torch.testing.assert_close(method.memory_v1[0], torch.tensor([0.5**0.5, 0.5**0.5]))
        torch.testing.assert_close(method.memory_v1[2], torch.tensor([0.8, 0.4]) / 0.8**0.5)
    row2 = torch.tensor([0.8 * momentum + r, 0.6 * momentum])  # row 0: m·[0, 1] + (1 − m)·[0, 1] stays [0, 1]
    torch.testing.assert_close(method.memory_v2, torch.stack([torch.tensor([0.0, 1.0]), start[1].flip(0),
                                                               row2 / row2.norm()]))


# ------------------------------------------------------------------------------------------------ negatives


UNBALANCED = torch.tensor([0] * 4 + [1] * 10 + [2] * 14 + [3] * 12)[torch.randperm(40,
                                                                                  generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("k", (5, 28, 16384))
def test_negatives_are_other_class_and_distinct_unless_the_class_has_fewer_than_k(k):
    """RepDistiller: with replacement exactly where an anchor's class has fewer than K other-class positions
    (here 36, 30, 26 and 28 for classes 0-3; K = 28 mixes both kinds in one batch)."""
    method = build(labels=UNBALANCED, num_train=40, options={"nce_k": k})
    assert method.num_negatives == k and method.params[0] == k
    assert method.replacement == {5: False, 28: None, 16384: True}[k]  # host-side: the usual cases need no sync
    pool = {c: int((UNBALANCED != c).sum()) for c in range(4)}
    anchors = torch.arange(40)
    for epoch, step in ((0, 0), (0, 1), (3, 17)):
        draw = method.negatives(anchors, epoch, step)
        assert draw.shape == (40, k) and draw.dtype == torch.long
        assert (UNBALANCED[draw] != UNBALANCED[anchors].unsqueeze(1)).all()  # every negative of another class
        for anchor, row in zip(anchors.tolist(), draw):
            distinct = set(row.unique().tolist())
            if pool[int(UNBALANCED[anchor])] >= k:
                assert len(distinct) == k
            else:  # with replacement: more draws than positions, so repeats; 16,384 draws cover the whole pool
                assert len(distinct) < k
                assert k < 1000 or distinct == {i for i in range(40) if UNBALANCED[i] != UNBALANCED[anchor]}


def test_the_same_seed_epoch_and_step_draw_the_same_negatives():
    method = build(labels=UNBALANCED, num_train=40, options={"nce_k": 8})
    anchors = torch.tensor([5, 0, 39, 12])

    def draw(m, epoch, step):
        return m.negatives(anchors, epoch, step).sort(dim=1).values

    first = draw(method, 2, 7)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(draw(method, 2, 7), first)
    assert torch.equal(draw(build(labels=UNBALANCED, num_train=40, options={"nce_k": 8}), 2, 7), first)
    assert not torch.equal(draw(method, 2, 8), first) and not torch.equal(draw(method, 3, 7), first)
    other_seed = build(labels=UNBALANCED, num_train=40, options={"nce_k": 8}, seed=1)
    assert not torch.equal(draw(other_seed, 2, 7), first)


def test_negatives_are_uniform_over_the_other_classes():
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    method = build(labels=labels, num_train=12, options={"nce_k": 4})
    draw = method.negatives(torch.zeros(4000, dtype=torch.long), 0, 0)  # 4000 independent draws for position 0
    counts = torch.bincount(draw.flatten(), minlength=12)
    assert counts[:4].sum() == 0
    # each of the 8 other-class positions is in a 4-of-8 draw with probability 1/2: 2000 ± 32 (1σ)
    assert (counts[4:] - 2000).abs().max() < 200
    subsets = torch.unique(draw.sort(dim=1).values, dim=0, return_counts=True)[1]
    assert len(subsets) == math.comb(8, 4)  # every 4-subset occurs (57 expected each)
    # K = 16 > 8 other-class positions: with replacement, each position 4000·16/8 = 8000 ± 85 (1σ) times
    method = build(labels=labels, num_train=12, options={"nce_k": 16})
    counts = torch.bincount(method.negatives(torch.zeros(4000, dtype=torch.long), 0, 0).flatten(), minlength=12)
    assert counts[:4].sum() == 0 and (counts[4:] - 8000).abs().max() < 500


# ------------------------------------------------------------------------------------------------ resume, Z


def test_state_dict_round_trip_restores_banks_z_labels_and_step_counter():
    torch.manual_seed(0)
    method = build(labels=UNBALANCED, num_train=40, options={"nce_k": 6})
    for step in range(3):
        method.losses(outputs(method, torch.randperm(40)[:4].tolist(), seed=step))
    z = method.params[2:4].clone()
    assert (z > 0).all()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert {"memory_v1", "memory_v2", "params", "train_labels", "steps"} <= set(state)

    torch.manual_seed(99)  # other banks and embeddings: everything must come from the state
    resumed = build(labels=None, num_train=40, options={"nce_k": 6})
    assert resumed.num_negatives == 0 and resumed.params[2] < 0 and resumed.replacement is None
    resumed.load_state_dict(state)  # no prepare(), as a resumed run
    for key, value in state.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.replacement is False and method.replacement is False
    assert resumed.steps_taken == 3 and resumed.num_negatives == 6 and torch.equal(resumed.params[2:4], z)

    out = outputs(method, [7, 1, 30, 22], epoch=1, seed=9)
    a, b = method.losses(out), resumed.losses(out)
    assert torch.equal(a["crd"], b["crd"]) and torch.equal(method.params, resumed.params)
    assert torch.equal(method.memory_v1, resumed.memory_v1) and torch.equal(method.memory_v2, resumed.memory_v2)
    assert method.steps == resumed.steps == 4


def test_z_is_set_on_the_first_batch_and_then_frozen():
    torch.manual_seed(0)
    method = build(labels=LABELS8, options={"nce_k": 2})
    assert method.params.tolist() == pytest.approx([2, 0.07, -1, -1, 0.5])
    method.losses(outputs(method, [0, 3], seed=0))
    z = method.params[2:4].clone()
    method.losses(outputs(method, [5, 6], seed=1))
    assert torch.equal(method.params[2:4], z)


# ------------------------------------------------------------------------------------------------ gradients


def test_gradients_reach_the_student_and_both_embeddings_never_the_teacher():
    torch.manual_seed(0)
    method = build(student=(6,), teacher=(7,), labels=LABELS8, options={"nce_k": 4})
    out = outputs(method, [0, 2, 5], requires_grad=True)
    terms = method.losses(out)
    terms["crd"].backward()
    assert out.student_features["pooled"].grad.abs().sum() > 0
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert out.teacher_features["pooled"].grad is None and out.teacher_logits.grad is None
    assert not any(b.requires_grad for b in method.buffers())
    # a second step's backward works after the first updated the banks in place
    out = outputs(method, [1, 3, 4], requires_grad=True, seed=1)
    sum(method.losses(out).values()).backward()
    assert out.student_features["pooled"].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ sizes, pairs


@pytest.mark.parametrize("teacher, student, params", [("vgg13", "vgg8", 131_328), ("resnet32x4", "resnet8x4", 65_792)])
def test_aux_parameter_counts_and_banks_match_the_spec(teacher, student, params):
    with torch.device("meta"):
        method = build(student, teacher, num_train=50_000)
    assert method.extra_params_train() == params and method.extra_params_inference() == 0
    assert method.student_taps == method.teacher_taps == ("pooled",)
    assert method.memory_v1.shape == method.memory_v2.shape == (50_000, 128)
    assert method.train_labels.shape == (50_000,)


def test_bank_init_is_uniform_in_plus_minus_a():
    method = build(num_train=4000, options={"feat_dim": 12})
    a = 1 / math.sqrt(12 / 3)
    for bank in (method.memory_v1, method.memory_v2):
        assert bank.min() >= -a and bank.max() <= a and bank.min() < -0.95 * a and bank.max() > 0.95 * a
        assert abs(bank.mean()) < 0.01
    assert not torch.equal(method.memory_v1, method.memory_v2)


def test_unknown_num_train_builds_banks_of_one_row():
    with torch.device("meta"):
        method = build("resnet8x4", "resnet32x4", num_train=0)
    assert method.memory_v1.shape == (1, 128) and method.train_labels.shape == (1,)
    assert build(num_train=0).memory_v2.shape == (1, 128)


@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_every_reference_pair_builds_and_its_losses_run(pair):
    teacher, student = pair
    torch.manual_seed(0)
    method = build(student, teacher, protocol="semckd", labels=torch.arange(16) % 5, num_train=16)
    assert method.num_negatives == 16384  # 12 other-class positions per anchor: drawn with replacement
    out = outputs(method, [3, 0, 15, 8], requires_grad=True)
    terms = method.losses(out)
    assert set(terms) == {"ce", "kd", "crd"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert out.student_features["pooled"].grad is not None


def test_errors_are_one_clear_line():
    with pytest.raises(KdbenchError, match="pooled"):
        CRD(method_context("crd", {"stage1": (4, 2, 2)}, {"pooled": (5,)}, "crd", num_train=8))
    method = build()
    with pytest.raises(RuntimeError, match="prepare"):
        method.losses(outputs(method, [0, 1]))
    with pytest.raises(ValueError, match="8 training positions"):
        build(labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(KdbenchError, match="two classes"):
        build(labels=torch.zeros(8, dtype=torch.long))
    prepared = build(labels=LABELS8)
    out = outputs(prepared, [0, 1])
    with pytest.raises(ValueError, match="position"):
        prepared.losses(StepOutputs(out.labels, out.student_logits, out.student_features, out.teacher_logits,
                                    out.teacher_features, epoch=0))


# ------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("protocol, ce, kd", [("official", 1.0, 0.0), ("crd", 1.0, 0.0), ("semckd", 1.0, 1.0)])
def test_presets_resolve_to_the_spec_weights(protocol, ce, kd):
    options = dict(CRD.resolve_options({}, protocol, "resnet32x4", "resnet8x4"))
    assert options == {"ce_weight": ce, "kd_weight": kd, "temperature": 4.0, "kl_reduction": "batchmean",
                       "beta": 0.8, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "feat_dim": 128}
    assert CRD.label(options) == ("crd (+KD)" if kd else "crd") and CRD.family == "relation"
    with pytest.raises(KdbenchError):
        CRD.resolve_options({"nce_m": "1.5"}, protocol)
    with pytest.raises(KdbenchError):
        CRD.resolve_options({"nce_k": "0"}, protocol)


# ------------------------------------------------------------------------------------------------ harness


def test_an_interrupted_run_resumes_to_the_same_history(env, monkeypatch):
    """The harness hands positions and labels; a run stopped after epoch 1 resumes (banks, Z, step counter from the
    checkpoint, no prepare) and ends exactly as an uninterrupted one."""
    recipe = Recipe("crd-few", epochs=2, batch_size=16, train_subset=48, test_subset=16, warmup_steps=0)
    teacher, student = tiny_sweep(methods=("crd",), recipe=recipe).plan()
    reference = run_sweep([teacher, student], env)[1]
    assert reference.status == "finished", reference.error
    assert reference.metrics["extra_params_train"] > 0
    shutil.rmtree(env.store.run_dir(student.run_id))  # the same teacher teaches it again

    real_prepare = CRD.prepare
    run_interrupted(monkeypatch, [student], env, 3)  # teacher scores, epoch 1, then epoch 2
    assert len(env.store.load_record(student.run_id).epochs) == 1
    monkeypatch.setattr(CRD, "prepare", lambda *a: pytest.fail("prepare ran on resume"))
    resumed = run_sweep([student], env)[0]
    monkeypatch.setattr(CRD, "prepare", real_prepare)
    keys = ("epoch", "top1", "loss", "loss_crd")
    assert resumed.status == "finished", resumed.error
    assert [[e[k] for k in keys] for e in resumed.epochs] == [[e[k] for k in keys] for e in reference.epochs]
