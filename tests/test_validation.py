"""Every bad input is caught before anything trains: one line on stderr, exit status 2, nothing written."""

import os
import urllib.error

import pytest
import torch
from conftest import TINY, tiny_sweep

from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.methods import list_methods, register_method
from kdbench.methods.kd import KD

BASE = ["--dataset", "synthetic", "--device", "cpu"]
PAIR = ["--pairs", "resnet14:resnet8"]
list_methods()  # the shipped methods load first, as they do before any plug-in


@register_method
class ProbeTA(KD):
    """A teacher-assistant method that its assistants' models cannot take, as a bad option or shape would make it."""

    name = "probe-ta"
    uses_assistants = True

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.role == "assistant":
            raise ValueError("probe-ta cannot be built for an assistant")


def fails_cleanly(capsys, argv: list[str], message: str, *unwritten) -> None:
    """``kdbench argv`` exits 2 with one line holding ``message``, and leaves none of ``unwritten`` behind."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("kdbench: error: ") and message in err, err
    assert out == "" and "Traceback" not in err
    assert not any(path.exists() for path in unwritten)


@pytest.mark.parametrize("argv, message", [
    # empty lists
    (["--methods", "student", "--pairs", ""], "no pairs: give --pairs or `pairs:`"),
    (["--methods", ",", *PAIR], "no methods: give --methods or `methods:` in the sweep file; valid methods: student"),
    # seeds out of range
    (["--methods", "student", *PAIR, "--seeds", "1180591620717411303424"],
     "--seeds: seed 1180591620717411303424 is out of range; seeds are integers from 0 to 2147483647"),
    (["--methods", "student", *PAIR, "--seeds=0,-1"], "--seeds: seed -1 is out of range"),
    (["--methods", "student", *PAIR, "--teacher-seed", str(2**31)], "--teacher-seeds: seed 2147483648 is out of range"),
    # learning rates
    (["--methods", "student", *PAIR, "--lr=-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--methods", "student", *PAIR, "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--methods", "student", *PAIR, "--teacher-lr", "0"], "--teacher-lr must be a finite number > 0, got 0.0"),
    (["--methods", "student", *PAIR, "--teacher-lr", "inf"], "--teacher-lr must be a finite number > 0, got inf"),
    # method option ranges
    (["--methods", "kd", *PAIR, "--set", "kd.temperature=0"], "option kd.temperature must be a finite number > 0; "
                                                              "got 0.0"),
    (["--methods", "kd", *PAIR, "--set", "kd.kd_weight=-0.5"], "option kd.kd_weight must be a finite number >= 0"),
    (["--methods", "fitnet", *PAIR, "--set", "fitnet.beta=nan"], "option fitnet.beta must be a finite number >= 0"),
    (["--methods", "fitnet", *PAIR, "--set", "fitnet.hint_layer=-1"], "option fitnet.hint_layer must be an integer "
                                                                      ">= 0; got -1"),
    (["--methods", "semckd", *PAIR, "--set", "semckd.beta=inf"], "option semckd.beta must be a finite number >= 0"),
    (["--methods", "dgkd", "--pairs", "resnet56:resnet20", "--set", "dgkd.p_survive=0"],
     "option dgkd.p_survive must be a finite number > 0 and <= 1; got 0.0"),
    (["--methods", "letkd1", *PAIR, "--set", "letkd1.k_penult=0"], "option letkd1.k_penult must be an integer >= 1"),
    (["--methods", "sakd", *PAIR, "--set", "sakd.tau_b=-1"], "option sakd.tau_b must be a finite number > 0"),
    # no step per epoch
    (["--methods", "semckd", *PAIR, "--batch-size", "128", "--train-subset", "64"],
     "the student resnet8 (semckd) would train on 64 images in batches of 128, and semckd needs full batches"),
    (["--methods", "student", *PAIR, "--recipe", "short", "--teacher-train-subset", "10"],
     "the teacher resnet14 (student) would train on 10 images in batches of 64, and recipe short-teacher drops the "
     "last batch"),
    (["--methods", "reviewkd", *PAIR, "--batch-size", "4", "--train-subset", "9"],
     "the student resnet8 (reviewkd) would train on 9 images in batches of 4, leaving a last batch of 1, and "
     "reviewkd needs at least 2 images a batch"),
    # methods that cannot be built on the pair's models: found before the teacher trains
    (["--methods", "kd,fitnet", *PAIR, "--set", "fitnet.hint_layer=99"],
     "fitnet cannot train the pair resnet14:resnet8: fitnet.hint_layer=99 is not a feature of both models"),
    (["--methods", "letkd1", *PAIR, "--set", "letkd1.k_penult=300000"],
     "letkd1 cannot train the pair resnet14:resnet8: letkd1: the fit at pre_pool would cluster"),
    (["--methods", "probe-ta", "--pairs", "resnet56:resnet20"],
     "probe-ta cannot train the teacher assistant resnet32 of resnet56:resnet20: probe-ta cannot be built"),
])
def test_bad_run_input_is_one_line_before_anything_runs(capsys, tmp_path, argv, message):
    results = tmp_path / "results"
    fails_cleanly(capsys, ["run", *BASE, *argv, "--results-dir", str(results)], message, results)


def test_results_dir_must_be_a_folder_kdbench_can_write(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for results in (taken, taken / "results"):
        fails_cleanly(capsys, ["run", *BASE, "--methods", "student", *PAIR, "--results-dir", str(results)],
                      f"--results-dir: {taken} is a file, not a directory", taken / "results")
    assert taken.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_results_dir_is_refused(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for results in (locked, locked / "results"):
            fails_cleanly(capsys, ["run", *BASE, "--methods", "student", *PAIR, "--results-dir", str(results)],
                          f"--results-dir: no permission to write in {locked}", locked / "results")
    finally:
        locked.chmod(0o700)


def test_report_out_must_be_writable(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    fails_cleanly(capsys, ["report", "--results-dir", str(tmp_path), "--out", str(taken / "report.md")],
                  f"--out: {taken} is a file, not a directory")
    fails_cleanly(capsys, ["report", "--results-dir", str(tmp_path), "--out", str(tmp_path)],
                  f"--out {tmp_path} is a directory")
    fails_cleanly(capsys, ["report", "--results-dir", str(tmp_path), "--plots", str(taken / "plots")],
                  f"--plots: {taken} is a file, not a directory")


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_missing_data_creates_no_data_dir(capsys, tmp_path, executor):
    """Checked before any run is claimed, and under Ray before a cluster starts."""
    data, results = tmp_path / "new" / "data", tmp_path / "results"
    fails_cleanly(capsys, ["run", "--dataset", "cifar10", "--device", "cpu", "--methods", "student", *PAIR,
                           "--data-dir", str(data), "--no-download", "--results-dir", str(results),
                           "--executor", executor],
                  "cifar10 not found in", data.parent, results)


def test_failed_download_leaves_no_data_dir(capsys, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(url, download_root, **_):  # as torchvision does: make the folder, then fail to connect
        os.makedirs(download_root, exist_ok=True)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    data, results = tmp_path / "new" / "data", tmp_path / "results"
    fails_cleanly(capsys, ["run", "--dataset", "cifar10", "--device", "cpu", "--methods", "student", *PAIR,
                           "--data-dir", str(data), "--results-dir", str(results)],
                  "cifar10 not found in", data.parent, results)
    assert tmp_path.exists()


def test_a_subset_that_holds_the_whole_split_is_no_subset():
    """synthetic has 640 training and 320 test images."""
    plain = [run.run_id for run in tiny_sweep(methods=("student", "kd")).plan()]
    for train, test in ((640, None), (10**6, 320), (None, 320)):
        whole = TINY.overridden(train_subset=train, test_subset=test)
        assert [run.run_id for run in tiny_sweep(methods=("student", "kd"), recipe=whole,
                                                 teacher_recipe=whole).plan()] == plain
    smaller = tiny_sweep(methods=("student", "kd"), recipe=TINY.overridden(train_subset=639)).plan()
    assert smaller[-1].recipe.train_subset == 639 and smaller[-1].run_id != plain[-1]


def test_planning_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny_sweep(methods=("fitnet", "semckd")).plan()
    assert torch.equal(torch.rand(3), expected)


def test_plan_checks_what_the_cli_checks():
    with pytest.raises(KdbenchError, match="fitnet cannot train the pair resnet14:resnet8"):
        tiny_sweep(methods=("fitnet",), method_options=(("fitnet", "hint_layer", "9"),)).plan()
    with pytest.raises(KdbenchError, match="--seeds names no seed"):
        tiny_sweep(seeds=()).plan()
