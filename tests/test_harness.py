import subprocess

import pandas as pd
import probe_methods  # noqa: F401  (registers probe-kd and probe-nan)
import pytest
import torch
from conftest import run_interrupted, tiny_sweep

import kdbench.harness as harness
from kdbench.errors import KdbenchError
from kdbench.harness import RunEnv, run_sweep
from kdbench.measure import code_changed
from kdbench.models import create_model
from kdbench.results import ResultsStore


def _history(record, *keys):
    return [tuple(epoch[k] for k in keys) for epoch in record.epochs]


@pytest.mark.slow
def test_tiny_sweep_trains_teacher_then_students_and_writes_tidy_table(env):
    probe_methods.ProbeKD.seen.clear()
    records = run_sweep(tiny_sweep(methods=("student", "probe-kd")).plan(), env)
    teacher, baseline, kd = records
    assert [r.status for r in records] == ["finished"] * 3
    assert (teacher.spec.role, baseline.spec.teacher, kd.spec.teacher_run) == ("teacher", None, teacher.run_id)
    # learns: the synthetic classes are separable, chance is 10 %
    assert teacher.metrics["top1_best"] > 50 and kd.metrics["top1_best"] > 25
    assert kd.metrics["teacher_top1"] == pytest.approx(teacher.metrics["top1_last"])
    assert kd.metrics["teacher_wall_s"] == teacher.metrics["wall_s"] > 0
    assert baseline.metrics["student_params"] == sum(p.numel() for p in create_model("resnet8", 10).parameters())
    assert kd.metrics["extra_params_train"] == 0 and kd.metrics["iters_per_epoch"] == 20
    for key in ("train_images_per_s", "step_ms_median", "step_ms_iqr", "eval_images_per_s", "cpu_peak_rss_bytes"):
        assert kd.metrics[key] > 0, key
    # the harness hands the method a frozen teacher's outputs and the student's taps with gradients
    assert probe_methods.ProbeKD.seen and not any(s["teacher_requires_grad"] for s in probe_methods.ProbeKD.seen)
    assert all(s["student_requires_grad"] and s["student_feature_shape"] == (32, 32, 16, 16)
               for s in probe_methods.ProbeKD.seen)

    table = pd.read_parquet(env.store.root / "metrics.parquet")
    assert set(table.run_id) == {r.run_id for r in records}
    for column in ("method", "pair", "protocol", "recipe", "seed", "metric", "value", "unit", "epoch", "split",
                   "torch_version", "git_sha", "kdbench_version", "device_name"):
        assert column in table.columns, column
    kd_rows = table[table.run_id == kd.run_id]
    per_epoch = kd_rows[kd_rows.metric == "top1"]
    assert sorted(per_epoch.epoch) == [1, 2, 3] and set(per_epoch.split) == {"test"}
    assert {"loss_ce", "loss_kd", "lr", "train_top1"} <= set(kd_rows.metric)
    assert kd_rows.pair.unique().tolist() == ["resnet14->resnet8"]
    assert (env.store.root / "metrics.csv").exists()
    assert not list(env.store.root.glob("*/latest.pt"))  # finished runs drop their resume state


@pytest.mark.slow
def test_a_checkout_is_dirty_for_uncommitted_code_not_for_rewritten_result_files(tmp_path):
    """Provenance's git_dirty: a changed Python file makes the checkout dirty; a committed run's result files,
    rewritten when the run is re-made inside a committed set, do not; outside a checkout nothing is known."""
    repo, plain = tmp_path / "repo", tmp_path / "plain"
    (repo / "pkg").mkdir(parents=True)
    (repo / "results" / "run").mkdir(parents=True)
    plain.mkdir()
    code, spec = repo / "pkg" / "code.py", repo / "results" / "run" / "spec.json"
    code.write_text("x = 1\n")
    spec.write_text("{}\n")
    for args in (("init", "-q"), ("add", "."), ("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    assert code_changed(repo / "pkg") is False
    spec.write_text('{"seed": 0}\n')
    assert code_changed(repo / "pkg") is False
    code.write_text("x = 2\n")
    assert code_changed(repo / "pkg") is True and code_changed(repo / "results") is True
    assert code_changed(plain) is None


def test_same_seed_same_metrics(tmp_path):
    a, b = (run_sweep(tiny_sweep().plan()[1:], RunEnv(ResultsStore(tmp_path / n), progress=False))[0]
            for n in "ab")
    keys = ("top1", "top5", "loss", "train_top1")
    assert _history(a, *keys) == _history(b, *keys)
    other = run_sweep(tiny_sweep(seeds=(1,)).plan()[1:], RunEnv(ResultsStore(tmp_path / "c"), progress=False))[0]
    assert _history(other, *keys) != _history(a, *keys)


@pytest.mark.slow
def test_finished_runs_are_skipped(env, monkeypatch):
    specs = tiny_sweep().plan()
    first = run_sweep(specs, env)
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = run_sweep(specs, env)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in first]


def test_interrupted_run_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    spec = tiny_sweep().plan()[1]
    reference = run_sweep([spec], RunEnv(ResultsStore(tmp_path / "ref"), progress=False))[0]

    env = RunEnv(ResultsStore(tmp_path / "resumed"), progress=False)
    run_interrupted(monkeypatch, [spec], env, 2)  # in epoch 2
    partial = env.store.load_record(spec.run_id)
    assert partial.status == "running" and len(partial.epochs) == 1
    assert env.store.checkpoint_path(spec.run_id).exists()

    resumed = run_sweep([spec], env)[0]
    keys = ("epoch", "top1", "loss", "lr")
    assert resumed.status == "finished" and _history(resumed, *keys) == _history(reference, *keys)


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_sweep_goes_on(env):
    records = run_sweep(tiny_sweep(methods=("probe-nan", "student")).plan(), env)
    failed = [r for r in records if r.status == "failed"]
    assert len(failed) == 1 and failed[0].spec.method == "probe-nan"
    assert "non-finite training loss" in failed[0].error
    assert [r.status for r in records if r.spec.method == "student"] == ["finished", "finished"]
    table = pd.read_parquet(env.store.root / "metrics.parquet")
    assert set(table.status) == {"finished", "failed"}


def _repdistiller_checkpoint(model, path):
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(70.0), "optimizer": {}}, path)


@pytest.mark.slow
def test_teacher_checkpoint_is_imported_and_checked(env, tmp_path):
    trained = run_sweep(tiny_sweep().plan()[:1], env)[0]
    teacher = create_model("resnet14", 10)
    teacher.load_state_dict(torch.load(env.store.weights_path(trained.run_id), weights_only=True))
    ckpt = tmp_path / "ckpt_epoch_240.pth"
    _repdistiller_checkpoint(teacher, ckpt)
    sha = harness.sha256_file(ckpt)
    ckpt_env = RunEnv(env.store, checkpoints={sha: ckpt}, progress=False)
    imported, kd = run_sweep(tiny_sweep(methods=("probe-kd",), teacher_ckpt_sha256=sha).plan(), ckpt_env)
    assert imported.spec.pretrained == sha and imported.provenance["checkpoint_sha256"] == sha
    assert imported.metrics["top1_last"] == pytest.approx(trained.metrics["top1_last"])
    assert kd.status == "finished" and kd.spec.teacher_run == imported.run_id

    wrong = tmp_path / "wrong.pth"
    _repdistiller_checkpoint(create_model("resnet8", 10), wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path, message in ((wrong, "does not fit"), (garbage, "cannot read teacher checkpoint")):
        sha = harness.sha256_file(path)
        with pytest.raises(KdbenchError, match=message):
            run_sweep(tiny_sweep(teacher_ckpt_sha256=sha).plan(), RunEnv(env.store, checkpoints={sha: path}))


@pytest.mark.slow
def test_an_init_stage_trains_first_with_its_own_optimiser_then_freezes(tmp_path, monkeypatch):
    """A method's InitStage runs before the recipe's epochs (numbered 1 − init .. 0), at its constant lr, over its
    parameters only; what it freezes stays fixed in the main stage; throughput and accuracy are the main stage's;
    a run interrupted inside the stage resumes there and ends as an uninterrupted one."""
    from probe_methods import ProbeInit

    teacher, spec = tiny_sweep(methods=("probe-init",)).plan()
    ProbeInit.stages_seen.clear()
    reference = run_sweep([teacher, spec], RunEnv(ResultsStore(tmp_path / "ref"), progress=False))[1]
    stages = [s for s, _ in ProbeInit.stages_seen]
    steps = stages.count("init") // 2
    assert stages == ["init"] * 2 * steps + ["main"] * 3 * steps
    # one epoch axis: the init stage's epochs are -2 and -1 (so no init epoch replays a main epoch's data stream)
    assert sorted(set(ProbeInit.stages_seen)) == [("init", -2), ("init", -1), ("main", 0), ("main", 1), ("main", 2)]
    assert [e["epoch"] for e in reference.epochs] == [-1, 0, 1, 2, 3]
    assert [e["lr"] for e in reference.epochs[:2]] == [0.02, 0.02]
    assert [set(k for k in e if k.startswith("loss_")) for e in reference.epochs] == [{"loss_hint"}] * 2 + [
        {"loss_ce", "loss_hint"}] * 3
    # the regressor learns in the init stage and is frozen after it: its hint loss stops changing by training
    assert reference.epochs[1]["loss_hint"] < reference.epochs[0]["loss_hint"]
    assert reference.metrics["init_epochs"] == 2 and reference.metrics["epochs_completed"] == 3
    assert reference.metrics["top1_last"] == reference.epochs[-1]["top1"]
    assert reference.metrics["wall_s"] == pytest.approx(sum(e["epoch_s"] + e["eval_s"] for e in reference.epochs))

    env = RunEnv(ResultsStore(tmp_path / "resumed"), progress=False)
    run_sweep([teacher], env)
    run_interrupted(monkeypatch, [spec], env, 3)  # the teacher check, init epoch 1, then init epoch 2
    assert [e["epoch"] for e in env.store.load_record(spec.run_id).epochs] == [-1]
    resumed = run_sweep([spec], env)[0]
    keys = ("epoch", "top1", "loss", "lr")
    assert resumed.status == "finished" and _history(resumed, *keys) == _history(reference, *keys)
