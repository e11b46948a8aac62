"""The dry run: plan classification, pricing by the recipe, no writes, and agreement with a real sweep."""

import time

import pytest
import torch
from conftest import TINY, tiny_sweep

import kdbench.estimate as estimate_module
import kdbench.harness as harness
import kdbench.reuse as reuse
from kdbench.estimate import estimate, format_estimate
from kdbench.fingerprint import fingerprint
from kdbench.harness import RunEnv, run_sweep
from kdbench.results import RunRecord, sha256_file

COST = estimate_module._Cost(step=0.5, eval_image=0.01, teacher_eval_image=0.02, fit_image=0.1, reuse_image=0.001,
                             epoch=0.3, run=2.0)
STEPS, TEST = 20, 320  # the synthetic set under TINY: 640 training images in batches of 32, 320 test images
EPOCH_S = STEPS * COST.step + TEST * COST.eval_image + COST.epoch


def _fixed_cost(monkeypatch) -> list:
    measured = []
    monkeypatch.setattr(estimate_module, "_measure", lambda spec, *a: measured.append(spec) or COST)
    return measured


def _record(env, spec, status, epochs=0, code=None):
    prov = {**fingerprint(spec), **({"code_fingerprint": code} if code else {})}
    if status == "finished":  # a finished run has its weights
        env.store.save_torch(env.store.weights_path(spec.run_id), {"weight": torch.zeros(1)})
        prov["weights_sha256"] = sha256_file(env.store.weights_path(spec.run_id))
    history = [{"epoch": e + 1, "top1": 50.0, "epoch_s": 1.0, "eval_s": 0.1} for e in range(epochs)]
    env.store.write_record(RunRecord(spec, status, {"wall_s": 1.0} if status == "finished" else {}, history, prov))


def _plan_with_history(env):
    """Teacher finished, kd interrupted after one epoch, fitnet finished by other code, the baseline new."""
    teacher, baseline, kd, fitnet = specs = tiny_sweep(methods=("student", "kd", "fitnet")).plan()
    _record(env, teacher, "finished", 3)
    _record(env, kd, "running", 1)
    env.store.save_torch(env.store.checkpoint_path(kd.run_id), {"stand-in": 1})
    _record(env, fitnet, "finished", 3, code="other code")
    return specs


def test_plan_is_classified_and_priced_by_the_recipe(env, monkeypatch):
    measured = _fixed_cost(monkeypatch)
    specs = _plan_with_history(env)
    est = estimate(specs, env)
    by_method = {r.method if r.role != "teacher" else "teacher": r for r in est.runs}
    assert [(r.status, r.epochs) for r in est.runs] == [("cached", 0), ("train", 3), ("resume", 2), ("stale", 3)]
    assert by_method["teacher"].seconds == 0
    assert by_method["student"].seconds == pytest.approx(COST.run + 3 * EPOCH_S)  # no teacher, no prepare
    # resumed: the remaining epochs and the teacher's evaluation, no offline fit (the checkpoint holds it)
    assert by_method["kd"].seconds == pytest.approx(COST.run + TEST * COST.teacher_eval_image + 2 * EPOCH_S)
    assert by_method["fitnet"].seconds == pytest.approx(COST.run + TEST * COST.teacher_eval_image + 3 * EPOCH_S
                                                        + 640 * COST.fit_image)
    assert len(measured) == 3 and est.total_s == pytest.approx(sum(r.seconds for r in est.runs))
    # --reuse-stale keeps a stale run, as harness.run does
    kept = estimate(specs, RunEnv(env.store, reuse_stale=True))
    assert [r.status for r in kept.runs] == ["cached", "train", "resume", "cached"] and kept.runs[3].seconds == 0
    # an imported teacher checkpoint is evaluated only
    imported = estimate(tiny_sweep(methods=("kd",), teacher_ckpt_sha256="0" * 64).plan(), env).runs[0]
    assert (imported.status, imported.seconds) == ("import", pytest.approx(COST.run + TEST * COST.eval_image))
    text = format_estimate(est)
    for word in ("teacher", "student", "kd", "fitnet", "device-h", "total", "3 settings on cpu", "offline fit"):
        assert word in text, word


def test_estimate_scales_with_epochs_and_seeds(env, monkeypatch):
    _fixed_cost(monkeypatch)
    short = estimate(tiny_sweep(methods=("kd",)).plan(), env)
    long = estimate(tiny_sweep(methods=("kd",), recipe=TINY.overridden(epochs=6)).plan(), env)
    assert long.runs[1].seconds - short.runs[1].seconds == pytest.approx(3 * EPOCH_S)
    # a second seed of the same teacher reuses a cached fit: its prepare costs reuse_image, not fit_image
    two = estimate(tiny_sweep(methods=("kd",), seeds=(0, 1)).plan(), env)
    assert two.runs[1].seconds - two.runs[2].seconds == pytest.approx(640 * (COST.fit_image - COST.reuse_image))


def test_an_init_stage_is_priced_with_its_epochs(env, monkeypatch):
    """AB/FT/FSP-style init epochs run before the recipe's, each step at the init stage's own measured cost; a run
    resumed inside or after the stage pays what is left of both."""
    from dataclasses import replace

    import probe_methods  # noqa: F401  (probe-init: 2 init epochs)

    init_step = 0.125
    init_epoch_s = EPOCH_S - STEPS * (COST.step - init_step)
    monkeypatch.setattr(estimate_module, "_measure", lambda spec, *a: replace(COST, init_epochs=2,
                                                                              init_step=init_step))
    teacher, spec = tiny_sweep(methods=("probe-init",)).plan()
    _record(env, teacher, "finished", 3)
    fresh = estimate([teacher, spec], env).runs[1]
    assert fresh.epochs == 2 + 3
    _record(env, spec, "running", 1)  # inside the stage: one init epoch left
    env.store.save_torch(env.store.checkpoint_path(spec.run_id), {"stand-in": 1})
    inside = estimate([teacher, spec], env).runs[1]
    assert (inside.status, inside.epochs) == ("resume", 4)
    assert fresh.seconds - inside.seconds == pytest.approx(init_epoch_s + 640 * COST.fit_image)
    _record(env, spec, "running", 3)  # both init epochs and the first main one
    resumed = estimate([teacher, spec], env).runs[1]
    assert (resumed.status, resumed.epochs) == ("resume", 2)
    assert fresh.seconds - resumed.seconds == pytest.approx(2 * init_epoch_s + EPOCH_S + 640 * COST.fit_image)


def test_the_init_stage_step_is_measured_on_its_own(env, monkeypatch):
    """The dry run times the init stage's steps (warm-up, then timed) before and apart from the main ones."""
    import probe_methods  # noqa: F401

    calls, real = [], harness._train_epoch

    def train_epoch(parts, loader, spec, epoch, timer, show, stage="main"):
        calls.append((stage, epoch, loader.steps_per_epoch))
        return real(parts, loader, spec, epoch, timer, show, stage)

    monkeypatch.setattr(harness, "_train_epoch", train_epoch)
    teacher, spec = tiny_sweep(methods=("probe-init",)).plan()
    cost = estimate_module._measure(spec, env, 2, 1, {})
    warm = estimate_module.WARMUP_STEPS
    assert calls == [("init", -2, warm), ("init", -1, 2), ("main", 0, warm), ("main", 1, 2)]
    assert cost.init_epochs == 2 and cost.init_step > 0 and cost.step > 0


def _tree(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_dry_run_measures_settings_and_writes_nothing(env):
    specs = _plan_with_history(env)
    before = _tree(env.store.root)
    est = estimate(specs, env, steps=2, eval_batches=1)
    assert _tree(env.store.root) == before
    assert [r.status for r in est.runs] == ["cached", "train", "resume", "stale"] and est.settings == 3
    assert all(r.seconds > 0 for r in est.runs[1:])
    assert "measured 2 training steps" in format_estimate(est, per_run=True)


def test_dry_run_prices_damaged_runs_as_runs_to_make_and_repairs_nothing(env, monkeypatch):
    """A finished run with damaged weights and one with an unreadable record: the sweep would set them aside and
    train them, so the dry run prices them so, and leaves the files as they are."""
    _fixed_cost(monkeypatch)
    teacher, baseline, kd, fitnet = specs = _plan_with_history(env)
    env.store.weights_path(teacher.run_id).write_bytes(b"damaged")
    record = env.store.run_dir(fitnet.run_id) / "record.json"
    record.write_text(record.read_text()[:40])
    before = _tree(env.store.root)
    est = estimate(specs, env)
    assert _tree(env.store.root) == before
    assert [(r.status, r.note.split(":")[0]) for r in est.runs[::3]] == [
        ("train", "its weights are damaged"), ("train", "unreadable record")]


def _without_weights(env, specs, code=None):
    """Finished records whose weights are not there, as a fresh clone holds a committed set."""
    for spec in specs:
        _record(env, spec, "finished", 3, code)
        env.store.weights_path(spec.run_id).unlink()


def test_dry_run_plans_nothing_for_a_set_without_weights_and_remakes_what_a_new_run_needs(env, monkeypatch):
    _fixed_cost(monkeypatch)
    _without_weights(env, tiny_sweep(methods=("kd",)).plan())
    done = estimate(tiny_sweep(methods=("kd",)).plan(), env)
    assert [r.status for r in done.runs] == ["cached", "cached"] and done.total_s == 0
    assert "\n0 runs to train;" in format_estimate(done)
    est = estimate(tiny_sweep(methods=("kd",), seeds=(0, 1)).plan(), env)  # a new seed: it loads the teacher
    teacher, kept, new = est.runs
    assert (teacher.status, teacher.epochs, teacher.note) == ("remake", 3, "weights needed by 1 run")
    assert teacher.seconds == pytest.approx(COST.run + 3 * EPOCH_S) and (kept.status, new.status) == ("cached", "train")
    text = format_estimate(est)
    assert "\n2 runs to train;" in text and f"need them: {teacher.run_id} (weights needed by 1 run)" in text


def test_a_run_remade_for_its_weights_needs_the_weights_of_its_own_teacher(env, monkeypatch):
    """A teacher-assistant chain without weights: the student, made by other code, trains again and needs the
    assistant, which is made again and needs the teacher in turn."""
    _fixed_cost(monkeypatch)
    teacher, assistant, student = specs = tiny_sweep(methods=("takd",), pair=("resnet20", "resnet8"),
                                                     ta_chains=(("resnet20", "resnet14", "resnet8"),)).plan()
    _without_weights(env, specs[:2])
    _without_weights(env, specs[2:], code="other code")
    assert reuse.weights_to_remake(specs, env) == {teacher.run_id: 2, assistant.run_id: 1}
    assert [(r.status, r.note) for r in estimate(specs, env).runs[:2]] == [
        ("remake", "weights needed by 2 runs"), ("remake", "weights needed by 1 run")]
    assert reuse.weights_to_remake(specs, RunEnv(env.store, reuse_stale=True)) == {}  # the student kept


@pytest.mark.slow
def test_estimate_agrees_with_a_small_sweep(env, monkeypatch):
    """Loosely (a factor of 3), as a ratio of the same machine's timings: not a wall-clock threshold. Per run it would
    flake: another process on a 2-core machine can slow one run several times over."""
    specs = tiny_sweep(methods=("student", "kd")).plan()
    est = estimate(specs, env)
    actual = {}
    real = harness.run

    def timed(spec, *args, **kwargs):
        started = time.perf_counter()
        record = real(spec, *args, **kwargs)
        actual[spec.run_id] = time.perf_counter() - started
        return record

    monkeypatch.setattr(harness, "run", timed)
    assert [r.status for r in run_sweep(specs, env)] == ["finished"] * 3
    assert 1 / 3 < est.total_s / sum(actual.values()) < 3


def test_a_run_that_would_diverge_is_still_priced(env):
    import probe_methods  # noqa: F401  (registers probe-nan: a loss that is NaN from the first step)

    est = estimate(tiny_sweep(methods=("probe-nan",)).plan(), env)
    assert [r.status for r in est.runs] == ["train", "train"] and all(r.seconds > 0 for r in est.runs)


def test_eval_every_prices_the_evaluations_of_each_stage(env, monkeypatch):
    """Under ``eval_every`` = 2 a 2-epoch init stage is evaluated once and a 3-epoch main stage twice
    (Recipe.evaluates), so the run costs two evaluations less than one evaluated after every epoch."""
    from dataclasses import replace

    import probe_methods  # noqa: F401  (probe-init: 2 init epochs)

    monkeypatch.setattr(estimate_module, "_measure", lambda spec, *a: replace(COST, init_epochs=2))
    teacher, every = tiny_sweep(methods=("probe-init",)).plan()
    _record(env, teacher, "finished", 3)
    sparse_teacher, sparse = tiny_sweep(methods=("probe-init",),
                                        recipe=replace(every.recipe, eval_every=2, teacher_recipe=None)).plan()
    _record(env, sparse_teacher, "finished", 3)
    every_s, sparse_s = (estimate([t, s], env).runs[1].seconds for t, s in ((teacher, every), (sparse_teacher, sparse)))
    assert every_s - sparse_s == pytest.approx(2 * TEST * COST.eval_image)
