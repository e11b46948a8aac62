"""Costs priced in one sitting (kdbench/costs.py, ``kdbench costs``): every finished run priced again on one machine,
and the report's throughput and end-to-end columns taken from the sitting where it priced a whole row and the
trainers behind it, else from the runs' own timings, never a mix."""

import dataclasses

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from conftest import tiny_sweep

from kdbench import costs
from kdbench.cli import main
from kdbench.estimate import estimate
from kdbench.harness import RunEnv, run_sweep
from kdbench.report import flagged_figures, leaderboard, load_results, render_report, runs
from kdbench.report.aggregate import entries
from kdbench.spec import Recipe

TWO_EPOCHS = Recipe("two-epochs", epochs=2, batch_size=8, train_subset=16, test_subset=16, warmup_steps=0)


@pytest.fixture
def finished(env):
    """A teacher, and CE and kd students of seeds 0 and 1, finished."""
    records = run_sweep(tiny_sweep(methods=("student", "kd"), seeds=(0, 1), recipe=TWO_EPOCHS).plan(), env)
    assert len(records) == 5 and all(r.status == "finished" for r in records)
    return env.store, {(r.spec.role, r.spec.method, r.spec.seed): r for r in records}


def _fake_sitting(store, priced: list, sitting_id="s1"):
    """A costs.parquet that prices ``priced`` ((record, img/s, run seconds) each) in sitting ``sitting_id``."""
    costs.write(store.root, pd.DataFrame([
        {"run_id": r.run_id, "metric": metric, "value": value, "sitting": f"sitting {sitting_id}",
         "sitting_id": sitting_id, "run_timestamp": r.provenance["timestamp"]}
        for r, speed, seconds in priced
        for metric, value in (("sitting_train_images_per_s", speed), ("sitting_run_s", seconds))]))


def _board(store):
    table = load_results(store.root)
    frame = entries(table)
    board = leaderboard(frame, "top1_best")
    return table, frame, board.set_index("label"), render_report(board, "github", "pair", "leaderboard",
                                                                  pd.DataFrame(), pd.DataFrame(), [])


def test_a_sitting_prices_every_finished_run_with_its_machine_in_every_row(finished, capsys):
    store, records = finished
    assert main(["costs", "--results-dir", str(store.root), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "5 finished runs priced in one sitting" in err
    settings = [line for line in err.splitlines() if line.startswith("kdbench: setting ")]  # one line each, as timed
    assert len(settings) == 3 and settings[0].startswith("kdbench: setting 1/3, ")
    assert any("student kd " in line and "(2 runs): " in line and line.endswith(" img/s") for line in settings)
    sitting = pd.read_parquet(store.root / costs.COSTS_FILE)
    assert sorted(sitting["run_id"].unique()) == sorted(r.run_id for r in records.values())
    assert set(sitting["metric"]) == {"sitting_train_images_per_s", "sitting_run_s"}
    assert (sitting["value"] > 0).all() and sitting["sitting_id"].nunique() == 1
    assert (sitting["steps"] == 2).all() and sitting["device_name"].notna().all()
    assert sitting["sitting"].str.contains("2 steps per setting").all()
    stamps = {r.run_id: r.provenance["timestamp"] for r in records.values()}
    assert (sitting["run_timestamp"] == sitting["run_id"].map(stamps)).all()
    # the report reads it: every row of this table shows the sitting's costs
    _, _, board, text = _board(store)
    assert board["cost_sitting"].ne("").all() and "priced in one sitting" in text


def test_the_report_shows_the_sittings_costs_for_a_row_it_priced_whole_and_keeps_the_runs_own(finished):
    store, records = finished
    teacher, ce0 = records["teacher", "student", 0], records["student", "student", 0]
    kd = [records["student", "kd", 0], records["student", "kd", 1]]
    own = runs(load_results(store.root)).set_index("run_id")
    _fake_sitting(store, [(kd[0], 100.0, 40.0), (kd[1], 120.0, 60.0), (teacher, 200.0, 300.0), (ce0, 900.0, 10.0)])
    table, frame, board, text = _board(store)
    wide = runs(table).set_index("run_id")
    assert wide.loc[kd[0].run_id, "train_images_per_s"] == own.loc[kd[0].run_id, "train_images_per_s"]  # kept
    assert wide.loc[kd[0].run_id, "sitting_end_to_end_s"] == 40.0 + 300.0 / 2  # no fit time added: two students
    assert board.loc["kd", "train_images_per_s"] == 110.0 and board.loc["kd", "end_to_end_s"] == 200.0
    assert board.loc["kd", "cost_sitting"] == "sitting s1"
    teacher_row = board[board["kind"] == "teacher"].iloc[0]
    assert teacher_row["end_to_end_s"] == 300.0 and teacher_row["train_images_per_s"] == 200.0
    # CE seed 1 is not priced: the CE row keeps both seeds' own timings, not a mix, and the note names it
    ce_row = board[board["kind"] == "student"].iloc[0]
    ce_own = own[own["method"].eq("student") & own["role"].eq("student")]["train_images_per_s"].mean()
    assert ce_row["cost_sitting"] == "" and ce_row["train_images_per_s"] == pytest.approx(ce_own)
    assert "priced in one sitting (kdbench costs; sitting s1)" in text
    assert "from the runs' own timings: student resnet8 (CE)" in text
    (_, figures), = flagged_figures(frame, table, "top1_best")
    axis_note = figures["accuracy_vs_throughput"].get_supxlabel()
    assert "img/s: priced in one sitting (kdbench costs; sitting s1); the other runs: their own timings" in axis_note
    assert "one sitting" not in figures["top1"].get_supxlabel()  # only the plot with a throughput axis says so
    plt.close("all")


def test_a_student_whose_teacher_the_sitting_did_not_price_keeps_its_own_costs(finished):
    store, records = finished
    _fake_sitting(store, [(records["student", "kd", 0], 100.0, 40.0), (records["student", "kd", 1], 120.0, 60.0)])
    _, _, board, text = _board(store)
    assert board.loc["kd", "cost_sitting"] == "" and board.loc["kd", "train_images_per_s"] not in (100.0, 110.0)
    assert "one sitting" not in text


def test_a_run_made_again_since_the_sitting_is_not_priced_by_it(finished):
    store, records = finished
    teacher, kd = records["teacher", "student", 0], [records["student", "kd", s] for s in (0, 1)]
    _fake_sitting(store, [(teacher, 200.0, 300.0), (kd[0], 100.0, 40.0), (kd[1], 120.0, 60.0)])
    stale = pd.read_parquet(store.root / costs.COSTS_FILE)
    stale.loc[stale["run_id"] == kd[1].run_id, "run_timestamp"] = "2020-01-01T00:00:00+00:00"
    costs.write(store.root, stale)
    _, _, board, _ = _board(store)
    assert board.loc["kd", "cost_sitting"] == ""  # one seed's price is another run's: the row keeps its own


def test_a_setting_that_cannot_be_timed_is_left_out_and_the_sitting_goes_on(finished, capsys, monkeypatch):
    store, records = finished
    real = costs.estimate

    def failing(specs, *args, **kwargs):
        if specs[0].method == "kd":
            raise RuntimeError("an injected bug in kd")
        return real(specs, *args, **kwargs)

    monkeypatch.setattr(costs, "estimate", failing)
    assert main(["costs", "--results-dir", str(store.root), "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert f"not priced: {records['student', 'kd', 0].run_id}: could not be timed (RuntimeError: an injected" in err
    assert "3 finished runs priced in one sitting" in err and "2 left out" in err
    assert sum(line.endswith("could not be timed") for line in err.splitlines()) == 1
    sitting = pd.read_parquet(store.root / costs.COSTS_FILE)
    assert not sitting["run_id"].str.startswith("student-kd").any()


def test_every_run_pays_its_whole_fit_in_a_sitting_and_a_sweep_pays_a_shared_fit_once(finished, tmp_path):
    store, records = finished
    kd = [records["student", "kd", s].spec for s in (0, 1)]  # one setting: the same price, unless a fit is shared
    scratch = RunEnv(type(store)(tmp_path / "scratch"), progress=False)
    each, shared = (estimate(kd, scratch, 1, shared_fits=flag).runs for flag in (False, True))
    assert each[0].seconds == each[1].seconds
    assert shared[0].seconds != shared[1].seconds  # the second seed reuses the first one's fit


def test_a_sitting_prices_only_runs_it_can_time_as_they_ran(finished):
    """One process on a device this machine has: a run across processes, or on a GPU absent here, keeps its own."""
    store, records = finished
    spec = records["student", "kd", 0].spec
    assert costs.priceable(spec)
    assert not costs.priceable(dataclasses.replace(spec, world_size=2))
    assert costs.priceable(dataclasses.replace(spec, device="cuda")) == torch.cuda.is_available()


@pytest.mark.parametrize("args, says", [
    (["costs", "--results-dir", "nowhere"], "results directory nowhere does not exist"),
    (["costs", "--results-dir", "results/metrics.parquet"], "results directory results/metrics.parquet is a file"),
    (["costs", "--results-dir", "results", "--runs", "student-nothing-*"], "no run in results matches --runs"),
    (["costs", "--results-dir", "results", "--steps", "0"], "--steps 0: give at least 1 timed step"),
])
def test_bad_input_is_one_line(finished, capsys, monkeypatch, args, says):
    store, _ = finished
    monkeypatch.chdir(store.root.parent)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdbench: error: ") and says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("content, says", [(b"not parquet", "cannot read"), (None, "lacks column(s) sitting, ")])
def test_an_unreadable_or_foreign_sitting_is_one_line_from_the_report(finished, capsys, content, says):
    store, _ = finished
    path = store.root / costs.COSTS_FILE
    if content is None:
        pd.DataFrame({"run_id": ["x"], "metric": ["m"], "value": [1.0]}).to_parquet(path)
    else:
        path.write_bytes(content)
    assert main(["report", "--results-dir", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdbench: error: {path}" if content is None else f"kdbench: error: cannot read {path}")
    assert says in err and "kdbench costs --results-dir" in err and err.count("\n") == 1, err
