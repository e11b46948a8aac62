"""TAKD and DGKD: teacher-assistant chains, stochastic teaching, TA caching and resume, recorded cost."""

import collections

import pytest
import torch
from conftest import method_context, tiny_sweep

import kdbench.harness as harness
from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.harness import run_sweep
from kdbench.methods import method_class
from kdbench.methods.assistants import default_chain, parameter_count
from kdbench.methods.base import StepOutputs, kd_divergence
from kdbench.spec import Recipe

CHAIN = ("resnet32", "resnet20", "resnet14", "resnet8")  # teacher, two assistants, student
SHORT_CHAIN_RECIPE = Recipe("chain", epochs=2, batch_size=16, train_subset=64, test_subset=32, warmup_steps=0)


def chain_sweep(methods=("takd", "dgkd"), **changes):
    return tiny_sweep(methods=methods, pair=(CHAIN[0], CHAIN[-1]), recipe=SHORT_CHAIN_RECIPE,
                      ta_chains=(CHAIN,), **changes)


def dgkd(num_assistants=3, role="student", seed=0, **options):
    return method_class("dgkd")(method_context("dgkd", {}, {}, "semckd", {k: str(v) for k, v in options.items()},
                                               seed=seed, role=role, num_assistants=num_assistants))


# --- chains -------------------------------------------------------------------------------------------------------

def test_default_chains_shrink_from_teacher_to_student():
    assert default_chain("wrn_40_2", "wrn_16_2") == ("wrn_40_2", "wrn_34_2", "wrn_28_2", "wrn_22_2", "wrn_16_2")
    assert default_chain("vgg13", "vgg8") == ("vgg13", "vgg11", "vgg8")
    assert default_chain("resnet32x4", "resnet8x4") == ("resnet32x4", "resnet20x4", "resnet14x4", "resnet8x4")
    assert default_chain("resnet56", "resnet20") == ("resnet56", "resnet44", "resnet32", "resnet20")
    assert default_chain("resnet32", "resnet14") == ("resnet32", "resnet26", "resnet20", "resnet14")  # interpolated
    for teacher, student in [("wrn_40_2", "wrn_16_2"), ("resnet32x4", "resnet8x4"), ("resnet110", "resnet20")]:
        counts = [parameter_count(m) for m in default_chain(teacher, student)]
        assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)
    # the DGKD paper's teacher + TA parameter total for wrn_40_2 -> wrn_16_2 (methods.md §5.4)
    assert sum(parameter_count(m) for m in default_chain("wrn_40_2", "wrn_16_2")[:-1]) / 1e6 == pytest.approx(
        6.69, abs=0.01)
    with pytest.raises(KdbenchError, match="no default teacher-assistant chain for resnet32x4:ShuffleV2"):
        default_chain("resnet32x4", "ShuffleV2")


@pytest.mark.parametrize("chain, message", [
    ("resnet32:resnet44:resnet8", "resnet44 (0.667 M parameters) is not smaller than resnet32 (0.473 M) before it"),
    ("resnet32:resnet99:resnet8", "unknown model 'resnet99'"),
    ("resnet32:resnet20:resnet14", "does not end at the student resnet8 of the pair resnet32:resnet8"),
    ("vgg13:vgg11:vgg8", "--ta-chain vgg13:vgg11:vgg8 does not start at the teacher of any pair (resnet32:resnet8)"),
])
def test_bad_chains_are_one_line_errors(capsys, tmp_path, chain, message):
    code = main(["run", "--methods", "takd", "--pairs", "resnet32:resnet8", "--dataset", "synthetic",
                 "--ta-chain", chain, "--results-dir", str(tmp_path / "r"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_plan_trains_each_assistant_once_and_shares_a1():
    runs = chain_sweep().plan()
    roles = [(r.role, r.method, r.student) for r in runs]
    assert roles == [("teacher", "student", "resnet32"),
                     ("assistant", "kd", "resnet20"),  # A1 learns from the teacher alone: one run for both
                     ("assistant", "takd", "resnet14"), ("student", "takd", "resnet8"),
                     ("assistant", "dgkd", "resnet14"), ("student", "dgkd", "resnet8")]
    a1, takd_a2, takd_s, dgkd_a2, dgkd_s = runs[1:]
    assert takd_a2.assistant_runs == dgkd_a2.assistant_runs == (a1.run_id,)
    assert takd_s.assistant_runs == (a1.run_id, takd_a2.run_id) and dgkd_s.assistant_runs == (a1.run_id,
                                                                                              dgkd_a2.run_id)
    # lineage is part of the id: another teacher seed means other assistants
    other = chain_sweep(teacher_seeds=(1,)).plan()
    assert other[1].run_id != a1.run_id and other[1].teacher_run != a1.teacher_run


# --- stochastic teaching ------------------------------------------------------------------------------------------

def test_exact_k_drops_exactly_k_trainers_uniformly_teacher_included():
    method = dgkd(num_assistants=3)
    kept = [method.gates(epoch, step) for epoch in range(4) for step in range(500)]
    assert all(len(k) == 3 for k in kept)
    counts = collections.Counter(i for k in kept for i in k)
    for i in range(4):
        assert counts[i] / len(kept) == pytest.approx(0.75, abs=0.03)
    assert method.gates(2, 7) == dgkd(num_assistants=3).gates(2, 7)  # replayable
    assert dgkd(num_assistants=3, seed=1).gates(2, 7) != method.gates(2, 7) or \
        dgkd(num_assistants=3, seed=1).gates(2, 8) != method.gates(2, 8)
    protected = dgkd(num_assistants=3, teacher_droppable=False)
    assert all(0 in protected.gates(0, s) and len(protected.gates(0, s)) == 3 for s in range(200))


def test_bernoulli_keeps_each_with_p_and_never_none():
    method = dgkd(num_assistants=3, drop_mode="bernoulli", p_survive=0.75)
    kept = [method.gates(0, step) for step in range(3000)]
    assert all(kept)
    counts = collections.Counter(i for k in kept for i in k)
    # P(kept | not all dropped) = 0.75 / (1 - 0.25**4)
    for i in range(4):
        assert counts[i] / len(kept) == pytest.approx(0.75 / (1 - 0.25**4), abs=0.03)
    assert {len(k) for k in kept} == {1, 2, 3, 4}


def test_no_dropping_for_assistants_or_when_disabled():
    assert dgkd(num_assistants=2, role="assistant").gates(0, 0) == (0, 1, 2)
    assert dgkd(num_assistants=2, role="assistant", stochastic_tas=True).gates(0, 0) != (0, 1, 2)
    assert dgkd(num_assistants=2, drop_mode="none").gates(0, 0) == (0, 1, 2)
    assert dgkd(num_assistants=0).gates(0, 0) == (0,)


def test_dgkd_and_takd_losses():
    torch.manual_seed(0)
    zs, y = torch.randn(8, 100), torch.randint(0, 100, (8,))
    zt, a1, a2 = torch.randn(8, 100), torch.randn(8, 100), torch.randn(8, 100)
    out = StepOutputs(y, zs, {}, zt, {}, {1: a1, 2: a2})
    ce = torch.nn.functional.cross_entropy(zs, y)
    method = dgkd(num_assistants=2)
    assert method.trainers_for_step(0, 3) == method.kept and len(method.kept) == 2
    terms = method.losses(out)
    assert terms["kd"].item() == pytest.approx(sum(kd_divergence(zs, out.trainer_logits(i)) for i in method.kept)
                                               .item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    paper = dgkd(num_assistants=2, ce_scale="paper", trainer_reduction="mean")
    paper.trainers_for_step(0, 3)
    terms = paper.losses(out)
    assert terms["ce"].item() == pytest.approx(3 * ce.item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(sum(kd_divergence(zs, out.trainer_logits(i)) for i in paper.kept)
                                               .item() / 2, rel=1e-5)
    assert dgkd(num_assistants=2, skip_dropped_forward=False).trainers_for_step(0, 3) == (0, 1, 2)
    with pytest.raises(KdbenchError, match="option dgkd.drop_mode is one of exact_k, bernoulli, none"):
        method_class("dgkd").resolve_options({"drop_mode": "random"})

    takd = method_class("takd")(method_context("takd", {}, {}, "crd", batch_size=8, num_assistants=2))
    assert takd.trainers_for_step(0, 0) == (2,)
    terms = takd.losses(StepOutputs(y, zs, {}, None, None, {2: a2}))
    assert terms["kd"].item() == pytest.approx(0.9 * kd_divergence(zs, a2).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.1 * ce.item(), rel=1e-6)


# --- through the harness ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_chain_trains_once_skips_dropped_forwards_and_records_cost(env, monkeypatch):
    records = {r.run_id: r for r in run_sweep(chain_sweep().plan(), env)}
    assert all(r.status == "finished" for r in records.values())
    by_role = {(r.spec.role, r.spec.method, r.spec.student): r for r in records.values()}
    # frozen forwards per step: A1 <- T; dense A2 <- T, A1; DGKD student drops 1 of 3 and skips its forward
    assert by_role["assistant", "kd", "resnet20"].metrics["frozen_forwards_per_step"] == 1
    assert by_role["assistant", "dgkd", "resnet14"].metrics["frozen_forwards_per_step"] == 2
    assert by_role["assistant", "takd", "resnet14"].metrics["frozen_forwards_per_step"] == 1
    student = by_role["student", "dgkd", "resnet8"]
    assert student.metrics["frozen_forwards_per_step"] == 2
    assistants = [records[i] for i in student.spec.assistant_runs]
    assert student.metrics["assistant_trainings"] == 2
    assert student.metrics["assistant_wall_s"] == pytest.approx(sum(a.metrics["wall_s"] for a in assistants))
    assert student.metrics["end_to_end_wall_s"] == pytest.approx(
        student.metrics["wall_s"] + student.metrics["prepare_s"] + student.metrics["teacher_wall_s"]
        + student.metrics["assistant_wall_s"])
    assert student.metrics["cpu_s"] > 0

    # a second invocation trains nothing: every teacher, assistant and student run is cached
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: pytest.fail("a cached run was trained again"))
    again = run_sweep(chain_sweep().plan(), env)
    assert [r.to_dict() for r in again] == [records[r.run_id].to_dict() for r in again]


@pytest.mark.slow
def test_all_trainers_forwarded_when_asked(env):
    sweep = chain_sweep(methods=("dgkd",), method_options=(("dgkd", "skip_dropped_forward", "false"),))
    student = run_sweep(sweep.plan(), env)[-1]
    assert student.status == "finished" and student.metrics["frozen_forwards_per_step"] == 3


@pytest.mark.slow
def test_interrupted_chain_resumes_where_it_stopped(env, monkeypatch):
    plan = chain_sweep(methods=("takd",)).plan()
    a2 = plan[2]
    real_train_epoch = harness._train_epoch

    def interrupt_a2_in_epoch_two(parts, loader, spec, epoch, *args, **kwargs):
        if spec.run_id == a2.run_id and epoch == 1:
            raise KeyboardInterrupt
        return real_train_epoch(parts, loader, spec, epoch, *args, **kwargs)

    monkeypatch.setattr(harness, "_train_epoch", interrupt_a2_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, env)
    a1_before = env.store.load_record(plan[1].run_id)
    partial = env.store.load_record(a2.run_id)
    assert a1_before.status == "finished" and partial.status == "running" and len(partial.epochs) == 1

    monkeypatch.setattr(harness, "_train_epoch", real_train_epoch)
    records = run_sweep(plan, env)
    assert all(r.status == "finished" for r in records)
    assert env.store.load_record(plan[1].run_id).to_dict() == a1_before.to_dict()  # A1 not retrained
    resumed = env.store.load_record(a2.run_id)
    assert resumed.epochs[0] == partial.epochs[0] and len(resumed.epochs) == 2  # epoch 1 kept, epoch 2 trained


def test_cross_family_pair_without_chain_is_a_clear_error():
    with pytest.raises(KdbenchError, match="no default teacher-assistant chain for resnet32x4:ShuffleV2"):
        tiny_sweep(methods=("dgkd",), pair=("resnet32x4", "ShuffleV2")).plan()
    assert tiny_sweep(methods=("kd",), pair=("resnet32x4", "ShuffleV2")).plan()  # only TA methods need one
