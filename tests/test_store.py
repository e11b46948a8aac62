"""The results store: a directory's table holds exactly its own runs (nested sets are never pooled), damaged files
are set aside and their runs made again, runs are claimed, and files follow the umask."""

import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, tiny_sweep

from kdbench import harness, results, reuse
from kdbench.harness import RunEnv, run_sweep
from kdbench.results import LOCKS, ResultsStore, RunRecord
from kdbench.spec import RunSpec

# Two epochs: enough for a resume checkpoint before the last epoch; every run of these tests trains with it.
SHORT = replace(TINY, epochs=2)


def finished(store: ResultsStore, seed: int) -> RunRecord:
    spec = RunSpec(dataset="synthetic", student="resnet8", method="student", seed=seed, recipe=TINY)
    record = RunRecord(spec, "finished", {"top1_best": 50.0 + seed}, [], {})
    store.write_record(record)
    return record


def test_a_nested_result_set_stays_apart(tmp_path):
    outer, nested = ResultsStore(tmp_path / "results"), ResultsStore(tmp_path / "results" / "reference-set")
    mine = finished(outer, 0)
    theirs = [finished(nested, seed) for seed in (1, 2)]
    assert set(nested.rebuild_table().run_id) == {r.run_id for r in theirs}
    table = outer.rebuild_table()  # the nested set's own metrics.parquet sits one level down: not a run
    assert set(table.run_id) == {mine.run_id}
    assert set(nested.rebuild_table().run_id) == {r.run_id for r in theirs}


# ---------------------------------------------------------------------------------------------- damage is survived

def _truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _top1(record: RunRecord) -> list[float]:
    return [e["top1"] for e in record.epochs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undamaged, finished teacher + student sweep (two seeds): copied by each test, and compared with."""
    env = RunEnv(ResultsStore(tmp_path_factory.mktemp("reference") / "results"), progress=False)
    return env.store.root, run_sweep(tiny_sweep(seeds=(0, 1), recipe=SHORT).plan(), env)


@pytest.fixture
def finished_env(reference, env) -> RunEnv:
    """``env`` holding a copy of the reference sweep."""
    shutil.copytree(reference[0], env.store.root)
    return env


def _set_aside(folder: Path, name: str) -> list[Path]:
    return list(folder.glob(f"{name}.damaged-*"))


@pytest.mark.parametrize("damage", ["record", "rows", "teacher_weights", "teacher_weights_of_an_old_record"])
def test_a_damaged_file_is_set_aside_and_its_run_made_again(damage, reference, finished_env, caplog):
    env, specs = finished_env, tiny_sweep(seeds=(0, 1), recipe=SHORT).plan()
    teacher, student = (env.store.run_dir(s.run_id) for s in specs[:2])
    target = {"record": student / "record.json", "rows": student / "metrics.parquet"}.get(damage, teacher / "model.pt")
    if damage == "teacher_weights_of_an_old_record":  # made before records kept the weights' sha256
        record = json.loads((teacher / "record.json").read_text())
        del record["provenance"]["weights_sha256"]
        (teacher / "record.json").write_text(json.dumps(record))
    _truncate(target)
    with caplog.at_level(logging.WARNING, logger="kdbench"):
        records = run_sweep(specs, env)
    assert [r.status for r in records] == ["finished"] * 3
    assert [_top1(r) for r in records] == [_top1(r) for r in reference[1]]
    assert _set_aside(target.parent, target.name), "the damaged file was not kept"
    lines = [r.getMessage() for r in caplog.records if target.name in r.getMessage()]
    assert len(lines) == 1 and "set aside" in lines[0]
    # the line says what happens next: rows are written again from the record, a run loses nothing
    assert ("written again from record.json; the run stays" in lines[0]) == (damage == "rows")
    assert ("will be made again" in lines[0]) == (damage != "rows")
    table = pd.read_parquet(env.store.root / "metrics.parquet")
    assert set(table.run_id) == {s.run_id for s in specs}


def test_a_damaged_resume_checkpoint_is_set_aside_and_the_run_starts_over(reference, env, monkeypatch, caplog):
    specs = tiny_sweep(seeds=(0, 1), recipe=SHORT).plan()[:2]
    real_evaluate, calls = harness.evaluate, {"n": 0}

    def interrupt_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the student's second epoch, after the teacher's 2 and the student's first
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(harness, "evaluate", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(specs, env)
    monkeypatch.setattr(harness, "evaluate", real_evaluate)
    checkpoint = env.store.checkpoint_path(specs[1].run_id)
    _truncate(checkpoint)
    with caplog.at_level(logging.WARNING, logger="kdbench"):
        records = run_sweep(specs, env)
    assert [_top1(r) for r in records] == [_top1(r) for r in reference[1][:2]]
    assert _set_aside(checkpoint.parent, "latest.pt")
    assert any("latest.pt" in r.getMessage() and "set aside" in r.getMessage() for r in caplog.records)


def test_temp_files_of_killed_writers_are_removed_and_files_follow_the_umask(finished_env):
    env, specs = finished_env, tiny_sweep(seeds=(0, 1), recipe=SHORT).plan()
    leftovers = [env.store.run_dir(specs[1].run_id) / ".record.json.abc123.tmp", env.store.root / ".metrics.csv.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"")
    umask = os.umask(0o027)
    try:
        env.store.write_record(env.store.load_record(specs[1].run_id))
        with env.store.claim(specs[1].run_id):
            pass
        env.store.rebuild_table()
    finally:
        os.umask(umask)
    assert not any(p.exists() for p in leftovers)
    assert (env.store.run_dir(specs[1].run_id) / "record.json").stat().st_mode & 0o777 == 0o640


def test_a_run_held_by_another_process_is_put_off_and_then_waited_for(env):
    specs = tiny_sweep(seeds=(0, 1), recipe=replace(TINY, epochs=1)).plan()
    other = multiprocessing.get_context("spawn").Process(target=_hold,
                                                         args=(env.store.root, specs[1].run_id, specs[2].run_id))
    other.start()
    try:
        while not (env.store.root / LOCKS / f"{specs[1].run_id}.lock").exists():
            time.sleep(0.05)
        time.sleep(0.5)
        records = run_sweep(specs, env)
    finally:
        other.join()
    assert [r.status for r in records] == ["finished"] * 3
    # when each run's final record was written, to the nanosecond (the provenance timestamp has whole seconds, and
    # the tiny runs can start and end within one): the held run finished after the free one
    finished = [(env.store.run_dir(s.run_id) / "record.json").stat().st_mtime_ns for s in specs]
    assert finished[2] < finished[1], "the held run was not put off behind the free one"


def _hold(root: Path, run_id: str, until: str) -> None:
    """Holds ``run_id``'s claim until run ``until`` has finished (at most two minutes)."""
    store = ResultsStore(root)
    with store.claim(run_id):
        deadline = time.monotonic() + 120
        while not store.is_finished(until) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_full_disk_gives_one_line_naming_the_path(env, monkeypatch):
    monkeypatch.setattr(results.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))

    def write(path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")

    with pytest.raises(results.DiskFull, match=r"no space left on the device holding .*results.*model.pt"):
        results.atomic_write(env.store.root / "run" / "model.pt", write)
    assert not list((env.store.root / "run").glob(".*.tmp"))


def test_a_sweep_stopped_by_a_full_disk_resumes_once_space_is_freed(reference, env, monkeypatch):
    """torch reports a full disk in its own words, without an errno: the partial file on the disk tells."""
    specs = tiny_sweep(seeds=(0, 1), recipe=SHORT).plan()
    real_save, free = results.torch.save, {"bytes": 10**12}

    def save(obj, file):  # the store saves through the open temporary file
        if Path(file.name).name.startswith(".latest.pt.") and free["bytes"] == 10**12:
            real_save(obj, file)  # the disk fills up while the first checkpoint (the teacher's) is written
            free["bytes"] = 0
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")
        real_save(obj, file)

    monkeypatch.setattr(results.torch, "save", save)
    monkeypatch.setattr(results.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free["bytes"]))
    with pytest.raises(results.DiskFull, match=r"no space left on the device holding .*results.*latest.pt"):
        run_sweep(specs, env)
    free["bytes"] = 10**11  # space freed
    assert [_top1(r) for r in run_sweep(specs, env)] == [_top1(r) for r in reference[1]]
    assert not list(env.store.root.rglob(".*.tmp"))


def test_report_lists_an_unreadable_run_and_changes_nothing(finished_env):
    from kdbench.report import report

    env, specs = finished_env, tiny_sweep(seeds=(0, 1), recipe=SHORT).plan()
    damaged = env.store.run_dir(specs[2].run_id) / "record.json"
    _truncate(damaged)
    before = sorted(p.name for p in env.store.root.rglob("*"))
    text, _ = report([env.store.root])
    assert "Not counted (1 run folder could not be read" in text and specs[2].run_id in text
    assert sorted(p.name for p in env.store.root.rglob("*")) == before  # the report only reads
    env.store.load_record(specs[2].run_id)  # a sweep sets it aside, then is killed before the run is made again
    text, _ = report([env.store.root])
    assert "Not counted (1 run folder could not be read" in text and "its record was set aside" in text


def _hold_forever(root: Path, run_id: str) -> None:
    with ResultsStore(root).claim(run_id):
        time.sleep(600)


def test_a_claim_left_by_a_killed_process_is_taken_at_once(tmp_path):
    """The lock is an fcntl lock: it dies with its process, so a killed worker's run is never waited on."""
    store = ResultsStore(tmp_path)
    holder = multiprocessing.get_context("spawn").Process(target=_hold_forever, args=(tmp_path, "run"))
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the other process holds it
            with store.claim("run", wait=False) as free:
                if not free:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the other process never held the claim")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert (tmp_path / LOCKS / "run.lock").exists()  # the lock file stays, its lock does not
    with store.claim("run", wait=False) as free:
        assert free


# ------------------------------------------------------------------------------------------- runs without weights

ONE_EPOCH = replace(TINY, epochs=1)


def _kd_plan(seeds=(0,)) -> list[RunSpec]:
    """A teacher and kd students that load it: a run whose weights the next runs need."""
    return tiny_sweep(methods=("kd",), seeds=seeds, recipe=ONE_EPOCH).plan()


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A finished teacher and kd student (seed 0), copied by each test, and their records."""
    env = RunEnv(ResultsStore(tmp_path_factory.mktemp("taught") / "results"), progress=False)
    return env.store.root, run_sweep(_kd_plan(), env)


@pytest.fixture
def without_weights(taught, env) -> RunEnv:
    """``env`` holding a copy of ``taught`` as a fresh clone has a committed set: records, no model.pt."""
    shutil.copytree(taught[0], env.store.root)
    for weights in env.store.root.glob("*/model.pt"):
        weights.unlink()
    return env


def _nothing_set_aside(root: Path) -> bool:
    return not list(root.glob("*/*.damaged-*")) and not list(root.glob("*/*.remade-*"))


def test_a_finished_run_without_weights_stays_finished_and_is_skipped(taught, without_weights, monkeypatch):
    """Its teacher too: every run it teaches is finished, so nothing needs its weights."""
    env, specs = without_weights, _kd_plan()
    assert reuse.weights_to_remake(specs, env) == {}
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: pytest.fail("a finished run was trained again"))
    records = run_sweep(specs, env)
    assert [r.to_dict() for r in records] == [r.to_dict() for r in taught[1]]
    assert _nothing_set_aside(env.store.root) and not list(env.store.root.glob("*/model.pt"))
    assert set(pd.read_parquet(env.store.root / "metrics.parquet").run_id) == {s.run_id for s in specs}


@pytest.mark.parametrize("made_on", ["this machine", "another machine"])
def test_a_new_student_remakes_its_teacher_once(made_on, taught, without_weights, monkeypatch, caplog):
    """Trained again under its claim, its old record set aside; the new weights are compared with the recorded ones:
    bit-identical on this machine (CPU training is deterministic per machine and build), else a warning."""
    env, specs = without_weights, _kd_plan(seeds=(0, 1))
    teacher, old_student, new_student = (s.run_id for s in specs)
    recorded = taught[1][0].provenance["weights_sha256"]
    if made_on == "another machine":  # the record of weights that this machine does not make
        record = json.loads((env.store.run_dir(teacher) / "record.json").read_text())
        record["provenance"]["weights_sha256"] = recorded = "0" * 64
        (env.store.run_dir(teacher) / "record.json").write_text(json.dumps(record))
    assert reuse.weights_to_remake(specs, env) == {teacher: 1}
    with caplog.at_level(logging.INFO, logger="kdbench"):
        records = run_sweep(specs, env)
    assert [r.status for r in records] == ["finished"] * 3
    remade, kept, new = records
    assert remade.provenance["remade_from_weights_sha256"] == recorded
    assert new.provenance["teacher_weights_sha256"] == remade.provenance["weights_sha256"]
    assert kept.to_dict() == taught[1][1].to_dict() and not env.store.weights_path(old_student).exists()
    assert len(list(env.store.run_dir(teacher).glob("record.json.remade-*"))) == 1  # the old record, kept
    compared = [r.getMessage() for r in caplog.records if "re-made weights" in r.getMessage()]
    if made_on == "this machine":
        assert remade.provenance["weights_sha256"] == recorded and _top1(remade) == _top1(taught[1][0])
        assert len(compared) == 1 and "bit-identical" in compared[0]
    else:
        assert len(compared) == 1 and "differ" in compared[0] and "not bit-comparable" in compared[0]
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert [r.status for r in run_sweep(specs, env)] == ["finished"] * 3  # the teacher was made once


def test_a_run_taught_by_a_run_without_weights_fails_alone(without_weights):
    """Run outside a sweep that would re-make its teacher: a failed record that says why, not a stopped sweep."""
    spec = _kd_plan(seeds=(0, 1))[2]
    record = harness.run(spec, without_weights)
    assert record.status == "failed" and "has no weights (its model.pt is missing)" in record.error


def test_a_run_that_diverged_under_this_code_is_kept_failed_until_retry_failed(tmp_path, monkeypatch):
    """A non-finite loss repeats under the same code and machine: a second sweep keeps the failure (nothing to train,
    as the dry run says), and --retry-failed trains it again."""
    from kdbench.estimate import estimate, format_estimate

    specs = tiny_sweep(recipe=replace(TINY, epochs=1, lr=1e12), teacher_recipe=replace(TINY, epochs=1)).plan()
    env = RunEnv(ResultsStore(tmp_path / "results"), progress=False)
    first = run_sweep(specs, env)
    assert first[0].status == "finished" and first[1].status == "failed"
    assert first[1].error.startswith("RunFailed: non-finite training loss")
    assembled = []
    assemble = harness._assemble
    monkeypatch.setattr(harness, "_assemble", lambda spec, *a, **k: assembled.append(spec.run_id) or assemble(
        spec, *a, **k))
    again = run_sweep(specs, env)
    assert not assembled and again[1].error == first[1].error and again[1].status == "failed"
    text = format_estimate(estimate(specs, env))
    assert "diverged" in text and "0 runs to train" in text
    retried = run_sweep(specs, replace(env, retry_failed=True))
    assert assembled == [specs[1].run_id] and retried[1].status == "failed"
