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

from kdbench.cli import main
from kdbench.executors import RayOptions, execute, run_sweep_ray
from kdbench.harness import RunEnv, run_sweep
from kdbench.report import run_summary
from kdbench.results import LOCKS, ResultsStore

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a fake GPU: packing's tests
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


def _with_a_kill(sweep, root, role: str = "student"):
    """Runs ``sweep()`` while a watcher kill -9s the worker of the first ``role`` run past its first checkpoint."""
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_a_worker_mid_run, args=(root, stop, killed, role))
    watcher.start()
    try:
        result = sweep()
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was killed in the middle of a run"
    return result


def _sweep_with_a_kill(specs, root, role: str = "student"):
    return _with_a_kill(lambda: run_sweep_ray(specs, RunEnv(ResultsStore(root), progress=False), RayOptions(cpus=1)),
                        root, role)


# student, kd and fitnet x 2 seeds on synthetic data; two epochs of ten steps, so a kill lands in the second epoch
PLAN = ["run", "--methods", "student,kd,fitnet", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--seeds",
        "0,1", "--device", "cpu", "--recipe", "short", "--epochs", "2", "--teacher-epochs", "2", "--batch-size", "32",
        "--train-subset", "320", "--teacher-train-subset", "320", "--test-subset", "64"]


@pytest.mark.slow
def test_ray_sweep_equals_in_process_and_survives_a_killed_worker(cluster, tmp_path):
    """Through the CLI, on a two-worker cluster: the same table and the same weights as in-process, each run once,
    files readable by the group, after a worker is killed in the middle of a run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task runs (--ray-cpus 1)
    try:
        assert main([*PLAN, "--results-dir", str(tmp_path / "local")]) == 0
    finally:
        torch.set_num_threads(threads)
    umask = os.umask(0o022)
    root = tmp_path / "ray"
    try:
        assert _with_a_kill(lambda: main([*PLAN, "--results-dir", str(root), "--executor", "ray"]), root) == 0
    finally:
        os.umask(umask)
    local, ray_table = (pd.read_parquet(tmp_path / d / "metrics.parquet") for d in ("local", "ray"))
    assert ray_table.groupby(["run_id", "metric", "epoch"], dropna=False).size().max() == 1  # each result once
    assert set(ray_table.run_id) == set(local.run_id) and len(set(local.run_id)) == 7
    assert set(ray_table.status) == {"finished"}
    numbers = ["top1", "top5", "loss", "loss_ce", "train_top1", "top1_best", "top1_last", "top5_best"]
    keys = ["run_id", "metric", "epoch"]
    pick = [frame[frame.metric.isin(numbers)].set_index(keys)["value"].sort_index() for frame in (local, ray_table)]
    pd.testing.assert_series_equal(*pick, check_exact=True)
    for run_dir in (tmp_path / "local").glob("*-s*-*"):
        mine, theirs = (torch.load(d / run_dir.name / "model.pt", weights_only=True) for d in (run_dir.parent, root))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), run_dir.name
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


@pytest.mark.slow
def test_a_new_student_remakes_its_teacher_without_weights_under_ray(cluster, tmp_path, caplog):
    """The rule of the in-process executor (reuse.weights_to_remake): a finished teacher without weights is skipped
    until a new student needs it, then made again once, bit-identical."""
    env = RunEnv(ResultsStore(tmp_path / "ray"), progress=False)
    plan = [tiny_sweep(methods=("kd",), seeds=seeds, recipe=replace(TINY, epochs=1)).plan() for seeds in ((0,), (0, 1))]
    first = run_sweep_ray(plan[0], env, RayOptions(cpus=1))
    for weights in env.store.root.glob("*/model.pt"):
        weights.unlink()
    assert [r.to_dict() for r in run_sweep_ray(plan[0], env, RayOptions(cpus=1))] == [r.to_dict() for r in first]
    remade, kept, new = run_sweep_ray(plan[1], env, RayOptions(cpus=1))
    recorded = first[0].provenance["weights_sha256"]
    assert remade.provenance["remade_from_weights_sha256"] == remade.provenance["weights_sha256"] == recorded
    assert kept.to_dict() == first[1].to_dict() and new.status == "finished"


def _span(record) -> tuple[float, float]:
    """When a run trained: from its provenance's timestamp (whole seconds) for its wall time."""
    start = pd.Timestamp(record.provenance["timestamp"]).timestamp()
    return start, start + record.metrics["wall_s"]


@pytest.mark.slow
def test_runs_packed_on_a_gpu_share_it_at_once_and_compute_what_they_compute_alone(cluster, tmp_path):
    """--runs-per-gpu through the local executor, on the cluster's one fake GPU (CPU runs asking for a GPU each, as
    CUDA runs do): packed two to a GPU, they take half each and train at once, each recording the sharing and the
    numbers it makes alone; not packed, they take turns."""
    specs = [s for s in tiny_sweep(seeds=(0, 1), recipe=replace(TINY, epochs=6)).plan() if s.role == "student"]
    assert len(specs) == 2 and not any(s.teacher_run for s in specs)  # two independent runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task runs (RayOptions.cpus)
    try:
        alone = run_sweep(specs, RunEnv(ResultsStore(tmp_path / "alone"), progress=False))
    finally:
        torch.set_num_threads(threads)
    packed = execute(specs, RunEnv(ResultsStore(tmp_path / "packed"), progress=False), "local",
                     RayOptions(cpus=1, gpus=1.0), {s.run_id: 2 for s in specs})  # a GPU a run, over 2
    turns = run_sweep_ray(specs, RunEnv(ResultsStore(tmp_path / "turns"), progress=False), RayOptions(cpus=1, gpus=1.0))
    assert "(GPU shared by 2)" in run_summary(packed) and "shared" not in run_summary(alone)
    for mine, shared in zip(alone, packed):
        assert mine.provenance["device_shared_by"] == 1 and shared.provenance["device_shared_by"] == 2
        assert [{k: e[k] for k in ("top1", "loss")} for e in mine.epochs] == [
            {k: e[k] for k in ("top1", "loss")} for e in shared.epochs]
    (a0, a1), (b0, b1) = sorted(_span(r) for r in packed)
    assert a1 - a0 > 3 and b0 < a1 - 1.5, "two runs of half a GPU each did not train at once"
    # (taking turns, the second would start no earlier than a1 - 1: the timestamps are whole seconds)
    assert {r.provenance["device_shared_by"] for r in turns} == {1}
    (a0, a1), (b0, b1) = sorted(_span(r) for r in turns)
    assert b0 >= a1 - 1, "two runs of a whole GPU each trained at once on one GPU"
