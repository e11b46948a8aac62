"""Processes sharing a results dir: two identical sweeps split the work and train each run once; a redirected log
shows every epoch as it ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

SWEEP = ["run", "--methods", "student,kd", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--recipe",
         "short", "--epochs", "3", "--batch-size", "32", "--teacher-epochs", "3", "--seeds", "0,1", "--device", "cpu"]


@pytest.mark.slow
def test_two_identical_sweeps_train_each_run_once_and_log_every_epoch(tmp_path):
    results = tmp_path / "results"
    logs = [tmp_path / f"sweep{i}.log" for i in (1, 2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = []
    for log in logs:
        with open(log, "w") as out:
            processes.append(subprocess.Popen([sys.executable, "-m", "kdbench.cli", *SWEEP, "--results-dir",
                                               str(results)], stdout=subprocess.DEVNULL, stderr=out, env=env))
    seen_while_running = False
    while any(p.poll() is None for p in processes):
        seen_while_running |= any(" epoch 1/3 " in log.read_text() for log in logs)
        time.sleep(0.1)
    assert [p.returncode for p in processes] == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert seen_while_running, "no epoch line reached the log before the sweeps ended"
    lines = [line for log in logs for line in log.read_text().splitlines()]
    assert all(" starts (" in log.read_text() for log in logs), "one sweep trained nothing: the work was not split"
    runs = sorted(p.name for p in results.iterdir() if (p / "record.json").is_file())
    assert len(runs) == 5  # a teacher; student and kd, two seeds each
    for run_id in runs:
        assert sum(line == f"kdbench: {run_id} starts (3 epochs)" for line in lines) == 1, run_id
        epochs = [line.split()[3] for line in lines if line.startswith(f"kdbench: {run_id} epoch ")]
        assert epochs == ["1/3", "2/3", "3/3"], run_id
    table = pd.read_parquet(results / "metrics.parquet")
    assert sorted(table.run_id.unique()) == runs
    assert table.groupby(["run_id", "metric", "epoch"], dropna=False).size().max() == 1
