"""The validation split (Recipe.val_split, --val-split): held-out training images that are never trained on, and the
run metric top1_at_best_val, the test top-1 at the epoch that the validation split selects."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TINY, tiny_sweep

from kdbench.cli import main
from kdbench.data import load_dataset
from kdbench.harness import RunEnv, run_sweep
from kdbench.loader import DeviceLoader, _fixed_subset, split_training_set
from kdbench.measure import run_metrics
from kdbench.results import ResultsStore
from kdbench.spec import RECIPES, RunSpec


def test_the_split_is_fixed_disjoint_from_training_and_leaves_old_subsets_alone():
    train, held_out = split_training_set(1000, 200, 300, "a set")
    again, held_again = split_training_set(1000, 200, 300, "a set")
    assert torch.equal(train, again) and torch.equal(held_out, held_again)  # a constant, the same for every run
    assert len(train) == 200 and len(held_out) == 300 and not set(train.tolist()) & set(held_out.tolist())
    # every image outside the split can be trained on: the whole rest is the pool when no subset is asked for
    rest, _ = split_training_set(1000, None, 300, "a set")
    assert sorted(rest.tolist() + held_out.tolist()) == list(range(1000))
    # no split: the training subset every earlier run drew, so their run ids and results stand
    plain, none = split_training_set(1000, 200, None, "a set")
    assert torch.equal(plain, _fixed_subset(1000, 200, "a set")) and len(none) == 0


def test_the_loader_evaluates_the_split_unaugmented_and_never_trains_on_it():
    data = load_dataset("synthetic")
    loader = DeviceLoader(data, "cpu", batch_size=32, val_split=100)
    _, held_out = split_training_set(len(data.train_y), None, 100, "synthetic")
    assert loader.has_validation and loader.num_train == len(data.train_y) - 100
    seen = torch.cat([loader.subset[positions] for _, _, positions in loader.train_epoch(0, 0, positions=True)])
    assert not set(seen.tolist()) & set(held_out.tolist())
    x, y = next(loader.test_batches("val"))
    plain = DeviceLoader(replace(data, test_x=data.train_x[held_out], test_y=data.train_y[held_out]), "cpu",
                         batch_size=32)
    assert torch.equal(x, plain.test_x[:len(x)]) and torch.equal(y, data.train_y[held_out][:len(y)])
    assert not DeviceLoader(data, "cpu", batch_size=32).has_validation


def test_top1_at_best_val_is_the_test_top1_of_the_first_epoch_with_the_best_validation_top1():
    history = [{"epoch": e, "top1": t, "top5": 90.0, "val_top1": v, "val_top5": 95.0, "epoch_s": 1.0, "eval_s": 0.5,
                "epoch_cpu_s": 1.0, "frozen_forwards_per_step": 0.0, "eval_images_per_s": 1.0}
               for e, t, v in ((1, 50.0, 40.0), (2, 70.0, 62.0), (3, 64.0, 65.0), (4, 66.0, 65.0), (5, 61.0, 63.0))]
    metrics = run_metrics(history, [], torch.device("cpu"))
    assert metrics["top1_at_best_val"] == 64.0 and metrics["top1_at_best_val_epoch"] == 3.0
    assert metrics["val_top1_best"] == 65.0 and metrics["val_top1_last"] == 63.0
    assert metrics["top1_best"] == 70.0 and metrics["top1_best_epoch"] == 2.0  # selected on test: another epoch
    assert "top1_at_best_val" not in run_metrics([{k: v for k, v in h.items() if not k.startswith("val_")}
                                                   for h in history], [], torch.device("cpu"))


def test_runs_record_the_split_per_epoch_and_teachers_hold_out_the_same_images(tmp_path):
    recipe = replace(TINY, epochs=2, val_split=64)
    store = ResultsStore(tmp_path / "results")
    records = run_sweep(tiny_sweep(methods=("student", "kd"), recipe=recipe, teacher_recipe=recipe).plan(),
                        RunEnv(store, progress=False))
    assert [r.status for r in records] == ["finished"] * 3
    for record in records:
        epochs = record.epochs
        assert all(0 <= e["val_top1"] <= 100 for e in epochs)
        chosen = max(epochs, key=lambda e: e["val_top1"])
        assert record.metrics["top1_at_best_val"] == chosen["top1"]
        assert record.metrics["train_images"] == 640 - 64
    table = store.read_table(repair=False)[0]
    assert set(table["val_split"]) == {64}
    assert set(table.loc[table["metric"].isin(["val_top1", "val_top1_best"]), "split"]) == {"val"}
    assert set(table.loc[table["metric"] == "top1_at_best_val", "split"]) == {"test"}
    taught = table[table["method"] == "kd"]
    assert set(taught["teacher_seed"]) == {0}


def test_val_split_reaches_the_recipe_and_the_teachers_and_zero_turns_it_off():
    cpu = RECIPES.get("cpu")
    assert cpu.overridden(val_split=0).val_split is None
    assert cpu.overridden(val_split=123).val_split == 123
    assert cpu.overridden(val_split=123).train_images(60_000) == min(cpu.train_subset, 60_000 - 123)
    plan = tiny_sweep(methods=("kd",), recipe=replace(TINY, val_split=10), teacher_recipe=replace(TINY, val_split=10),
                      ).plan()
    assert {r.recipe.val_split for r in plan} == {10}


@pytest.mark.parametrize("args, message", [
    (["--val-split", "-3"], "--val-split must be an integer >= 0, got -3"),
    (["--val-split", "640"], "a validation split of 640 images leaves no training images: the synthetic training "
                             "set holds 640; use --val-split 639 or less (0: no split)"),
    (["--teacher-seeds", "0,x"], "malformed --teacher-seeds '0,x'"),
])
def test_bad_splits_and_teacher_seeds_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["run", "--methods", "kd", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--recipe",
                 "short", "--device", "cpu", "--results-dir", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_several_teacher_seeds_teach_every_student_seed():
    plan = tiny_sweep(methods=("student", "kd"), seeds=(0, 1), teacher_seeds=(0, 1)).plan()
    teachers = [r for r in plan if r.role == "teacher"]
    assert [t.seed for t in teachers] == [0, 1]
    kd = [(r.seed, r.teacher_run) for r in plan if r.method == "kd"]
    assert sorted(kd) == sorted((s, t.run_id) for s in (0, 1) for t in teachers)
    assert sum(r.method == "student" and r.role == "student" for r in plan) == 2  # CE needs no teacher: once


def test_eval_every_evaluates_every_kth_epoch_and_the_last_and_selects_among_them(tmp_path):
    recipe = replace(TINY, epochs=5, val_split=64, eval_every=2)
    assert [recipe.evaluates(e) for e in range(5)] == [False, True, False, True, True]
    record, = run_sweep([r for r in tiny_sweep(recipe=recipe).plan() if r.role == "student"],
                        RunEnv(ResultsStore(tmp_path / "results"), progress=False))
    assert record.status == "finished", record.error
    assert [("top1" in e, "val_top1" in e) for e in record.epochs] == [(False, False), (True, True), (False, False),
                                                                       (True, True), (True, True)]
    evaluated = [e for e in record.epochs if "top1" in e]
    chosen = max(evaluated, key=lambda e: e["val_top1"])
    assert record.metrics["top1_at_best_val_epoch"] == chosen["epoch"] in (2, 4, 5)
    assert record.metrics["epochs_completed"] == 5 and record.metrics["top1_last"] == record.epochs[-1]["top1"]
    assert record.metrics["wall_s"] == pytest.approx(sum(e["epoch_s"] + e["eval_s"] for e in record.epochs))
    assert RECIPES.get("cpu").eval_every == 6 and RECIPES.get("paper").eval_every is None


def test_recipes_without_a_split_or_eval_every_keep_the_run_ids_they_had_before_either_existed():
    """Both fields are left out of the hash while unset (RunSpec.run_id), so every cached run stays valid; the ids
    are those kdbench 47036a7 computed for the same specs."""
    tiny = RunSpec(dataset="synthetic", student="resnet8", method="student", seed=0, recipe=TINY)
    paper = RunSpec(dataset="cifar100", student="vgg8", method="kd", seed=1, recipe=RECIPES.get("paper"),
                    teacher="vgg13", teacher_run="teacher-x")
    assert (tiny.run_id, paper.run_id) == ("student-student-resnet8-s0-2d83006326aa",
                                           "student-kd-vgg8-s1-7adfa953cb69")
