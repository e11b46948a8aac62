"""The Ray executor: a local cluster started inside the test, a worker killed in the middle of a run."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace

import pandas as pd
import psutil
import pytest
import torch
from conftest import TINY, tiny_sweep

from kdbench.executors import RayOptions, run_sweep_ray
from kdbench.harness import RunEnv, run_sweep
from kdbench.results import LOCKS, ResultsStore

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _kill_a_worker_mid_run(root, stop: threading.Event, killed: list[str], role: str = "student") -> None:
    """Waits for the first epoch checkpoint of a ``role`` run, then kill -9s the worker process that holds the run's
    lock."""
    while not stop.is_set() and not killed:
        for checkpoint in root.glob(f"{role}-*/latest.pt"):
            lock = str((root / LOCKS / f"{checkpoint.parent.name}.lock").resolve())
            for process in psutil.process_iter():
                try:
                    if any(f.path == lock for f in process.open_files()) and process.pid != os.getpid():
                        process.kill()
                        killed.append(checkpoint.parent.name)
                        return
                except psutil.Error:
                    continue
        time.sleep(0.02)


def _sweep_with_a_kill(specs, root, role: str = "student"):
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_a_worker_mid_run, args=(root, stop, killed, role))
    watcher.start()
    try:
        records = run_sweep_ray(specs, RunEnv(ResultsStore(root), progress=False), RayOptions(cpus=1))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was killed in the middle of a run"
    return records


@pytest.mark.slow
def test_ray_sweep_equals_in_process_and_survives_a_killed_worker(cluster, tmp_path):
    specs = tiny_sweep(methods=("student", "kd"), seeds=(0,)).plan()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task runs (RayOptions.cpus)
    try:
        local = {r.run_id: r for r in run_sweep(specs, RunEnv(ResultsStore(tmp_path / "local"), progress=False))}
    finally:
        torch.set_num_threads(threads)
    umask = os.umask(0o022)
    root = tmp_path / "ray"
    try:
        records = _sweep_with_a_kill(specs, root)
    finally:
        os.umask(umask)
    assert [r.run_id for r in records] == [s.run_id for s in specs]
    for record in records:
        assert record.status == "finished"
        assert [e["top1"] for e in record.epochs] == [e["top1"] for e in local[record.run_id].epochs]
        assert [e["loss"] for e in record.epochs] == [e["loss"] for e in local[record.run_id].epochs]
    table = pd.read_parquet(root / "metrics.parquet")
    assert set(table.run_id) == {s.run_id for s in specs}
    assert table.groupby(["run_id", "metric", "epoch"], dropna=False).size().max() == 1  # each result once
    written = [p for p in root.rglob("*") if p.is_file()]
    assert written and all(p.stat().st_mode & 0o044 == 0o044 for p in written)  # group- and world-readable
    assert not list(root.rglob(".*.tmp"))


@pytest.mark.slow
def test_a_teacher_out_of_retries_fails_its_students_by_name(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr("kdbench.executors.RETRIES", 0)
    specs = tiny_sweep(methods=("student", "kd"), seeds=(0,), recipe=replace(TINY, epochs=2)).plan()
    teacher = specs[0]
    records = {r.run_id: r for r in _sweep_with_a_kill(specs, tmp_path / "ray", role="teacher")}
    assert records[teacher.run_id].status == "failed"
    assert records[teacher.run_id].error == "WorkerCrashedError: worker died 1 time"
    taught = [s for s in specs if s.teacher_run == teacher.run_id]
    assert taught and all(records[s.run_id].error == f"RunFailed: run {teacher.run_id} that teaches this one failed"
                          for s in taught)
    ce = next(s for s in specs if s.method == "student" and s.role == "student")
    assert records[ce.run_id].status == "finished"  # a run that the teacher does not teach goes on
