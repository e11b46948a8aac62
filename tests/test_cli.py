import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdbench.cli import main
from kdbench.models import create_model

TINY_ARGS = ["--dataset", "synthetic", "--recipe", "short", "--epochs", "1", "--batch-size", "32",
             "--teacher-epochs", "1", "--device", "cpu"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_everything(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert lines["methods"].split(", ")[0] == "student"
    assert {"vgg13", "vgg8", "resnet32x4", "ShuffleV2", "ResNet50", "wrn_40_2"} <= set(lines["models"].split(", "))
    assert {"cifar100", "cifar10", "fashion-mnist", "synthetic"} <= set(lines["datasets"].split(", "))
    assert lines["recipes"] == ("paper, letkd-native, short-teacher, short, cpu-teacher, cpu, imagenet, "
                                "imagenet-mdistiller, tiny-imagenet")


def test_run_writes_results_and_prints_the_table(capsys, tmp_path):
    results = tmp_path / "results"
    code, out, _ = run_cli(capsys, "run", "--methods", "student", "--pairs", "resnet14:resnet8", *TINY_ARGS,
                           "--seeds", "0,1", "--results-dir", str(results))
    assert code == 0
    assert out.count("finished") == 3 and "resnet14" in out and "top1 best" in out
    table = pd.read_parquet(results / "metrics.parquet")
    assert sorted(table[table.role == "student"].seed.unique()) == [0, 1]
    assert set(table.recipe) == {"short", "short-teacher"} and set(table.dataset) == {"synthetic"}


def _bad_checkpoints(tmp_path) -> dict[str, str]:
    """Files given as --teacher-ckpt, by the placeholder the test cases use."""
    files = {"WRONG": tmp_path / "wrong_arch.pth", "GARBAGE": tmp_path / "garbage.pth",
             "EMPTY": tmp_path / "empty.pth", "BADPICKLE": tmp_path / "bad_pickle.pth"}
    torch.save({"model": create_model("resnet8", 10).state_dict()}, files["WRONG"])
    files["GARBAGE"].write_text("this is not a checkpoint")
    files["EMPTY"].write_bytes(b"")
    files["BADPICKLE"].write_bytes(b"\x80\x02garbage")
    return {placeholder: str(path) for placeholder, path in files.items()}


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope", "--pairs", "resnet14:resnet8"], "unknown method 'nope'; valid methods: student"),
    (["--methods", "student", "--pairs", "resnet14:resnet9"],
     "unknown model 'resnet9'; valid models: MobileNetV2, resnet8, resnet14"),
    (["--methods", "student", "--pairs", "resnet14-resnet8"],
     "malformed pair 'resnet14-resnet8'; write TEACHER:STUDENT"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--dataset", "mnist"],
     "unknown dataset 'mnist'; valid datasets: cifar100, cifar10, fashion-mnist, synthetic"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--recipe", "long"],
     "unknown recipe 'long'; valid recipes: paper, letkd-native, short-teacher, short, cpu-teacher, cpu, imagenet"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--teacher-recipe", "long"],
     "unknown recipe 'long'; valid recipes: paper"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--teacher-epochs", "0"],
     "--teacher-epochs must be a positive integer, got 0"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--seeds", "0,x"], "malformed --seeds '0,x'"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--epochs", "0"], "--epochs must be a positive integer"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--epochs", "two"], "argument --epochs: invalid int"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--device", "tpu"], "unknown device 'tpu'"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--protocol", "x"], "unknown protocol 'x'"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--teacher-ckpt", "/nonexistent.pth"],
     "teacher checkpoint /nonexistent.pth does not exist"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--teacher-ckpt", "WRONG"], "does not fit"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--teacher-ckpt", "GARBAGE"],
     "is not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this file starts with b'this')"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--teacher-ckpt", "EMPTY"], "is empty (0 bytes)"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--teacher-ckpt", "BADPICKLE"],
     "cannot read teacher checkpoint"),
    (["--methods", "student", "--pairs", "resnet14:resnet8,vgg13:vgg8", "--teacher-ckpt", "WRONG"],
     "--teacher-ckpt holds one teacher"),
    (["--pairs", "resnet14:resnet8"], "no methods: give --methods or `methods:` in the sweep file"),
    (["--methods", "fitnet", "--pairs", "resnet14:resnet8", "--set", "fitnet.bet=3"],
     "method fitnet has no option 'bet'; its options: ce_weight, kd_weight, temperature, kl_reduction, hint_layer, "
     "beta"),
    (["--methods", "kd", "--pairs", "resnet14:resnet8", "--set", "kd.kl_reduction=sum"],
     "option kd.kl_reduction is one of batchmean, mean; got 'sum'"),
    (["--methods", "fitnet", "--pairs", "resnet14:resnet8", "--set", "kd.temperature=3"],
     "--set or the sweep file's options: options for kd, which the sweep does not run (methods: fitnet)"),
    (["--methods", "fitnet", "--pairs", "resnet14:resnet8", "--set", "fitnet.beta"], "malformed --set"),
    (["--methods", "fitnet", "--pairs", "resnet14:resnet8", "--set", "fitnet.hint_layer=x"],
     "option fitnet.hint_layer takes a int, got 'x'"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--runs-per-gpu", "0"],
     "--runs-per-gpu must be a positive integer, got 0"),
    (["--methods", "student", "--pairs", "resnet14:resnet8", "--runs-per-gpu", "4"],
     "--runs-per-gpu 4 shares a GPU, but the runs are on cpu; on CPUs, run several at once with --executor ray"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, argv, message):
    files = _bad_checkpoints(tmp_path)
    argv = [files.get(a, a) for a in argv]
    results = tmp_path / "results"
    code, out, err = run_cli(capsys, "run", *TINY_ARGS, *argv, "--results-dir", str(results))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kdbench: error: ") and message in err
    assert "Traceback" not in err and out == ""
    assert not results.exists()  # nothing written, nothing trained


def test_cuda_without_a_gpu_is_a_clear_error(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli(capsys, "run", "--methods", "student", "--pairs", "resnet14:resnet8",
                           "--dataset", "synthetic", "--device", "cuda", "--results-dir", str(tmp_path))
    assert code == 2 and "has no CUDA GPU" in err and err.count("\n") == 1


def test_console_script_is_installed():
    beside_python = Path(sys.executable).with_name("kdbench")
    exe = str(beside_python) if beside_python.exists() else shutil.which("kdbench")
    assert exe, "the kdbench console script is not installed (pip install -e .)"
    result = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "\nmethods: student, " in result.stdout


def test_dry_run_prints_the_plan_and_its_compute_and_writes_nothing(capsys, tmp_path):
    results = tmp_path / "results"
    code, out, _ = run_cli(capsys, "run", "--methods", "student,kd", "--pairs", "resnet14:resnet8", *TINY_ARGS,
                           "--results-dir", str(results), "--dry-run")
    assert code == 0 and not results.exists()
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["teacher"][1] == "1" and rows["student"][1] == "1" and rows["kd"][1] == "1"  # runs to train
    assert "device-hours" in out and "settings on cpu" in out


def test_an_interrupt_is_one_line_and_says_the_command_resumes(capsys, monkeypatch):
    """Ctrl-C between runs (here while listing) or in one: no traceback, exit 130, and how to go on."""
    from kdbench import listing

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(listing, "listing", interrupted)
    assert main(["list"]) == 130
    err = capsys.readouterr().err
    assert err == "kdbench: interrupted; the same command resumes (finished runs are kept, a run in progress goes on " \
                  "from its last epoch)\n"
