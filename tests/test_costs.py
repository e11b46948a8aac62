"""Costs priced in one sitting (kdbench/costs.py, ``kdbench costs``): every finished run priced again on one machine,
and the report's throughput and end-to-end columns taken from the sitting instead of the runs' own timings."""

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
    """A teacher, a CE student and a kd student, finished."""
    records = run_sweep(tiny_sweep(methods=("student", "kd"), recipe=TWO_EPOCHS).plan(), env)
    assert all(r.status == "finished" for r in records)
    return env.store, records


def test_a_sitting_prices_every_finished_run_from_scratch_with_its_machine_in_every_row(finished, capsys):
    store, records = finished
    assert main(["costs", "--results-dir", str(store.root), "--steps", "2"]) == 0
    assert "3 finished runs priced in one sitting" in capsys.readouterr().err
    sitting = pd.read_parquet(store.root / costs.COSTS_FILE)
    assert sorted(sitting["run_id"].unique()) == sorted(r.run_id for r in records)
    assert set(sitting["metric"]) == {"sitting_train_images_per_s", "sitting_run_s"}
    assert (sitting["value"] > 0).all() and sitting["sitting_id"].nunique() == 1
    assert (sitting["steps"] == 2).all() and sitting["device_name"].notna().all()
    assert sitting["sitting"].str.contains("2 steps per setting").all()
    # a finished run is priced as a run to train (the dry run would keep it and price nothing)
    kd = next(r for r in records if r.spec.method == "kd")
    assert estimate([kd.spec], RunEnv(store, progress=False)).runs[0].status == "cached"
    assert sitting.set_index(["run_id", "metric"])["value"][kd.run_id, "sitting_run_s"] > 0


def test_the_report_takes_throughput_and_end_to_end_from_the_sitting_and_keeps_the_runs_own(finished):
    store, records = finished
    table = load_results(store.root)
    own = runs(table).set_index("run_id")
    kd, teacher = (next(r for r in records if r.spec.role == role and r.spec.method == m)
                   for role, m in (("student", "kd"), ("teacher", "student")))
    fake = pd.DataFrame([{"run_id": r.run_id, "metric": metric, "value": value, "sitting": "a sitting", "steps": 2}
                         for r, speed, seconds in ((kd, 111.0, 40.0), (teacher, 222.0, 300.0))
                         for metric, value in (("sitting_train_images_per_s", speed), ("sitting_run_s", seconds))])
    costs.write(store.root, fake)
    table = load_results(store.root)
    wide = runs(table).set_index("run_id")
    assert wide.loc[kd.run_id, "train_images_per_s"] == 111.0
    assert wide.loc[kd.run_id, "own_train_images_per_s"] == own.loc[kd.run_id, "train_images_per_s"]
    assert wide.loc[kd.run_id, "own_wall_s"] == own.loc[kd.run_id, "wall_s"]
    assert wide.loc[kd.run_id, "cost_sitting"] == "a sitting"
    # the kd run's own price plus its teacher's, which teaches one student here; the teacher's row: its full price
    assert wide.loc[kd.run_id, "end_to_end_s"] == pytest.approx(40.0 + 300.0)
    assert wide.loc[teacher.run_id, "end_to_end_s"] == pytest.approx(300.0)
    ce = next(r for r in records if r.spec.role == "student" and r.spec.method == "student")
    assert pd.isna(wide.loc[ce.run_id, "cost_sitting"])  # not priced: its own timings
    assert wide.loc[ce.run_id, "train_images_per_s"] == own.loc[ce.run_id, "train_images_per_s"]
    board = leaderboard(entries(table), "top1_best")
    text = render_report(board, "github", "pair", "leaderboard", pd.DataFrame(), pd.DataFrame(), [])
    assert "priced in one sitting (kdbench costs; a sitting)" in text
    assert "from the runs' own timings: student resnet8 (CE)" in text  # the row the sitting did not price
    (_, figures), = flagged_figures(entries(table), table, "top1_best")
    axis_note = figures["accuracy_vs_throughput"].get_supxlabel()
    assert "img/s: priced in one sitting (kdbench costs; a sitting); the other runs: their own timings" in axis_note
    assert "one sitting" not in figures["top1"].get_supxlabel()  # only the plot with a throughput axis says so
    plt.close("all")


def test_no_sitting_leaves_the_runs_own_timings_and_says_nothing(finished):
    store, _ = finished
    table = load_results(store.root)
    wide = runs(table)
    assert wide["cost_sitting"].isna().all()
    assert (wide["train_images_per_s"].dropna() == wide["own_train_images_per_s"].dropna()).all()
    board = leaderboard(entries(table), "top1_best")
    assert "one sitting" not in render_report(board, "github", "pair", "leaderboard", pd.DataFrame(),
                                              pd.DataFrame(), [])


@pytest.mark.parametrize("args, says", [
    (["--results-dir", "nowhere"], "results directory nowhere does not exist"),
    (["--results-dir", "results", "--runs", "student-nothing-*"], "no run in results matches --runs"),
    (["--results-dir", "results", "--steps", "0"], "--steps 0: give at least 1 timed step"),
])
def test_bad_input_is_one_line_and_writes_nothing(finished, capsys, monkeypatch, args, says):
    store, _ = finished
    monkeypatch.chdir(store.root.parent)
    assert main(["costs", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdbench: error: ") and says in err and err.count("\n") == 1, err
    assert not (store.root / costs.COSTS_FILE).exists()


def test_an_unreadable_sitting_is_one_clear_error(finished):
    store, _ = finished
    (store.root / costs.COSTS_FILE).write_text("not parquet")
    with pytest.raises(Exception, match="cannot read .*costs.parquet.*kdbench costs --results-dir"):
        load_results(store.root)


def test_a_sitting_prices_only_runs_it_can_time_as_they_ran(finished):
    """One process on a device this machine has: a run across processes, or on a GPU absent here, keeps its own."""
    store, records = finished
    spec = records[0].spec
    assert costs.priceable(spec)
    assert not costs.priceable(dataclasses.replace(spec, world_size=2))
    assert costs.priceable(dataclasses.replace(spec, device="cuda")) == torch.cuda.is_available()
