"""benchmarks/official: both sides of a comparison with the official loops train on the same data, and its random
teachers are RepDistiller checkpoints that kdbench's models load."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision.datasets.cifar

from kdbench.data import load_cifar100
from kdbench.execution import load_weights
from kdbench.models import create_model

FAKE = Path(__file__).resolve().parents[1] / "benchmarks" / "official" / "fake_cifar100.py"


def test_the_fake_cifar100_is_the_same_images_to_kdbench_and_to_torchvision(tmp_path, monkeypatch):
    subprocess.run([sys.executable, str(FAKE), str(tmp_path), "40", "20"], check=True, capture_output=True)
    ours = load_cifar100(tmp_path / "kdbench", download=False, verify=False)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    for train, x, y in ((True, ours.train_x, ours.train_y), (False, ours.test_x, ours.test_y)):
        theirs = torchvision.datasets.CIFAR100(str(tmp_path / "torchvision"), train=train, download=False)
        assert len(theirs) == len(y) == (40 if train else 20)
        assert torch.equal(x, torch.from_numpy(theirs.data).permute(0, 3, 1, 2))  # theirs: N x H x W x C
        assert y.tolist() == theirs.targets
    for arch in ("vgg13", "resnet32x4"):  # at the path RepDistiller's get_teacher_name parses
        path = tmp_path / "teachers" / f"{arch}_cifar100_lr_0.05_decay_0.0005_trial_0" / f"{arch}_best.pth"
        load_weights(create_model(arch, 100, 3), path, "teacher checkpoint")  # strict: every key and shape fits


def test_the_gpu_checks_default_stages_are_limited_to_eight_minutes_in_all():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    stages = [s for s in gpu_check.LIMITS if s not in gpu_check.OPTIONAL]
    assert sum(gpu_check.LIMITS[s] for s in stages) <= 8 * 60


@pytest.mark.slow
def test_the_gpu_check_dry_run_writes_its_table_and_summary(tmp_path):
    """`make gpu-check-dry`'s plumbing, one stage of it: the commands run on the CPU and their runs become rows."""
    check = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(check), "--cpu", "--stages", "methods", "--methods", "kd",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / "gpu-check.csv")
    kd = table[(table.stage == "methods") & (table.name == "kd")].set_index("metric")["value"]
    assert kd["status"] == "finished" and float(kd["train_images_per_s"]) > 0 and float(kd["cpu_peak_rss_bytes"]) > 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## methods" in summary and "| kd " in summary and "the CPU dry run" in summary


@pytest.mark.slow
def test_the_allreduce_benchmark_times_a_models_gradients_across_two_gloo_processes():
    """benchmarks/allreduce.py under torchrun (gpu-check's ddp stage): one JSON line from rank 0, sized as ResNet-18's
    11.7 M parameters in fp32."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "allreduce.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), "tv_resnet18"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["processes"] == 2 and lines[0]["backend"] == "gloo"
    assert lines[0]["megabytes"] == pytest.approx(11.69e6 * 4 / 1e6, rel=0.01)
    assert lines[0]["allreduce_ms"] > 0 and lines[0]["bus_gb_per_s"] > 0


def test_traced_runs_a_script_under_the_profiler_and_writes_its_tables_and_trace(tmp_path):
    script = tmp_path / "work.py"
    script.write_text("import sys, torch\ntorch.randn(64, 64) @ torch.randn(64, 64)\nsys.exit(3)\n")
    traced = Path(__file__).resolve().parents[1] / "benchmarks" / "official" / "traced.py"
    out = tmp_path / "trace"
    done = subprocess.run([sys.executable, str(traced), str(out), str(script)], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-2000:]  # the script's own exit status
    assert "aten::mm" in (tmp_path / "trace.txt").read_text()
    with gzip.open(tmp_path / "trace.json.gz", "rt") as trace:
        assert "aten::mm" in trace.read()
