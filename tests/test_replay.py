"""Replays (kdbench/replay.py): a finished run trained again by the current code, compared number for number, and
what a match changes (the sweep keeps the run, the report counts it as the current code's) or a difference leaves."""

import json

import pytest
from conftest import tiny_sweep

from kdbench.cli import main
from kdbench.fingerprint import fingerprint, numeric_kernels, stale_reason
from kdbench.harness import run_sweep
from kdbench.replay import first_difference, replay, replay_run
from kdbench.report import load_results, runs
from kdbench.spec import Recipe

TWO_EPOCHS = Recipe("two-epochs", epochs=2, batch_size=8, train_subset=16, test_subset=16, warmup_steps=0)


@pytest.fixture
def finished(env):
    """A teacher and its kd student, finished, as a results dir made by earlier code would hold them."""
    teacher, student = run_sweep(tiny_sweep(methods=("kd",), recipe=TWO_EPOCHS).plan(), env)
    assert teacher.status == student.status == "finished"
    return env.store, teacher, student


def _pretend_earlier_code(store, run_id, **changes):
    """Rewrites the record as if other code had made it (and with ``changes`` to its epochs or provenance)."""
    path = store.run_dir(run_id) / "record.json"
    data = json.loads(path.read_text())
    data["provenance"].update(code_fingerprint="0" * 16, code_core="0" * 16, **changes.pop("provenance", {}))
    data["provenance"]["code_files"]["kdbench.harness"] = "0" * 64
    for key, value in changes.items():
        data["epochs"][0][key] = value
    path.write_text(json.dumps(data))
    store.write_record(store.load_record(run_id))  # its tidy rows too


def test_a_run_the_current_code_reproduces_is_kept_as_its_own(finished):
    store, teacher, student = finished
    _pretend_earlier_code(store, student.run_id)
    code = fingerprint(student.spec)
    assert stale_reason(store.load_record(student.run_id), code) == "kdbench.harness"  # before: other code
    teacher_record = (store.run_dir(teacher.run_id) / "record.json").read_bytes()

    outcome = replay_run(store, student.run_id)

    assert (outcome.status, outcome.epochs) == ("reproduced", 2), outcome.line()
    assert replay_run(store, student.run_id).line().endswith("current (replayed by this code before)")
    record = store.load_record(student.run_id)
    assert stale_reason(record, code) is None  # the sweep keeps it
    assert record.provenance["code_fingerprint"] == "0" * 16  # what made it stays recorded
    assert record.provenance["replayed_epochs"] == "2/2"
    assert record.provenance["replays"][code["code_fingerprint"]]["epochs_compared"] == 2
    assert record.epochs == student.epochs and record.metrics == student.metrics
    assert (store.run_dir(teacher.run_id) / "record.json").read_bytes() == teacher_record  # the teacher untouched
    row = runs(load_results(store.root)).set_index("run_id").loc[student.run_id]
    assert row["code_fingerprint"] == code["code_fingerprint"]  # the report counts it as this code's


def test_a_difference_is_named_and_changes_nothing(finished):
    store, _, student = finished
    _pretend_earlier_code(store, student.run_id, loss=123.0)
    before = (store.run_dir(student.run_id) / "record.json").read_bytes()
    outcome = replay_run(store, student.run_id, epochs=1)
    assert outcome.status == "differs" and "epoch 1 loss: recorded 123.0" in outcome.detail
    assert (store.run_dir(student.run_id) / "record.json").read_bytes() == before


def test_only_the_first_epochs_asked_for_are_trained_and_compared(finished):
    store, teacher, _ = finished
    _pretend_earlier_code(store, teacher.run_id)
    outcome = replay_run(store, teacher.run_id, epochs=1)
    assert (outcome.status, outcome.detail) == ("reproduced", "1 of 2 epochs identical")
    assert store.load_record(teacher.run_id).provenance["replayed_epochs"] == "1/2"


def test_runs_made_by_this_code_or_elsewhere_are_not_replayed(finished):
    store, teacher, student = finished
    _pretend_earlier_code(store, student.run_id, provenance={"torch_version": "1.0.0"})
    current, other = replay(store, [teacher.run_id, student.run_id])
    assert current.status == "current"
    assert other.status == "skipped" and "torch_version '1.0.0'" in other.detail


def _set_kernels(store, run_id, **kernels):
    """Rewrites the record's kernels (a value of None removes the key, as in a record made before they were kept)."""
    path = store.run_dir(run_id) / "record.json"
    data = json.loads(path.read_text())
    for key, value in kernels.items():
        data["provenance"].pop(key) if value is None else data["provenance"].update({key: value})
    path.write_text(json.dumps(data))


def test_kernels_are_compared_where_both_list_them(finished):
    """Another BLAS kernel set gives other bits on the same code and build (letKD-2's LDA): such a run is not
    replayed. A BLAS only one side loaded, and a run made before kdbench recorded its kernels, are not compared."""
    store, teacher, student = finished
    here = numeric_kernels()["blas_kernels"]
    assert store.load_record(student.run_id).provenance["blas_kernels"] == here
    numpy_blas = next(entry for entry in here.split("; ") if entry.startswith("numpy: openblas "))
    library, kernels = numpy_blas.rsplit(" ", 1)
    other_kernels = f"{library} {'SkylakeX' if kernels == 'Haswell' else 'Haswell'}"  # numpy's, other kernels
    _pretend_earlier_code(store, student.run_id)
    _set_kernels(store, student.run_id, blas_kernels=f"elsewhere: openblas 0.3.15 Zen; {other_kernels}")
    skipped = replay_run(store, student.run_id)
    assert skipped.status == "skipped" and f"numpy's BLAS {other_kernels[len('numpy: '):]!r} here" in skipped.detail
    assert "elsewhere" not in skipped.detail  # a BLAS this process has not loaded: not compared
    _pretend_earlier_code(store, teacher.run_id)
    _set_kernels(store, teacher.run_id, cpu_capability=None, blas_kernels=None)
    assert replay_run(store, teacher.run_id, epochs=1).status == "reproduced"


def test_timings_are_not_compared_but_every_computed_number_is():
    old = [{"epoch": 1, "loss": 1.5, "epoch_s": 3.0, "eval_images_per_s": 10.0, "top1": float("nan")}]
    assert first_difference(old, [{**old[0], "epoch_s": 9.0, "eval_images_per_s": 1.0}]) is None
    assert first_difference(old, [{**old[0], "lr": 0.1}]) == "epoch 1 lr: recorded None, replayed 0.1"


def test_the_cli_replays_the_runs_it_is_given_and_exits_1_on_a_difference(finished, capsys):
    store, teacher, student = finished
    _pretend_earlier_code(store, student.run_id, loss=123.0)
    assert main(["replay", "--results-dir", str(store.root), "--runs", "student-*", "--epochs", "1"]) == 1
    out = capsys.readouterr().out
    assert student.run_id in out and "differs" in out and teacher.run_id not in out
    assert main(["replay", "--results-dir", str(store.root), "--runs", "nothing-*"]) == 2
    assert capsys.readouterr().err.startswith("kdbench: error: no run in")


def test_the_report_says_which_runs_were_replayed(finished, capsys):
    store, _, student = finished
    _pretend_earlier_code(store, student.run_id)
    replay(store, [student.run_id])
    assert main(["report", "--results-dir", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "replayed by later code" in out and "1 of 1 (2/2 epochs)" in out
    assert "made by other code" not in out


def test_a_replay_that_fails_says_why_and_is_not_a_match(finished, monkeypatch):
    store, _, student = finished
    _pretend_earlier_code(store, student.run_id)
    from kdbench.methods.kd import KD

    def broken(self, out):
        raise RuntimeError("a bug in the new code")

    monkeypatch.setattr(KD, "losses", broken)
    outcome = replay_run(store, student.run_id)
    assert outcome.status == "differs" and "ended after 0 epochs: RuntimeError: a bug in the new code" in outcome.detail
