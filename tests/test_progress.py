"""Live progress: a line per run event and per epoch, and the TensorBoard and W&B sinks."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_sweep

from kdbench.harness import RunEnv, run_sweep


def test_every_run_event_and_epoch_gets_a_line(env, caplog):
    specs = tiny_sweep(seeds=(0, 1)).plan()
    with caplog.at_level(logging.INFO, logger="kdbench"):
        run_sweep(specs, env)
        run_sweep(specs[:1], env)
    lines = [r.getMessage() for r in caplog.records]
    for spec in specs:
        mine = [line for line in lines if line.startswith(spec.run_id)]
        assert mine[0] == f"{spec.run_id} starts (3 epochs)"
        epochs = [line for line in mine if " epoch " in line]
        assert [line.split()[2] for line in epochs] == ["1/3", "2/3", "3/3"]
        assert all(" img/s ETA run " in line and " sweep " in line for line in epochs)
        assert "finished: top1 " in mine[4]
    assert lines[-1] == f"{specs[0].run_id} [1/1] skipped: finished before"


def test_tensorboard_sink_gets_every_epoch(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    env = RunEnv(_store(tmp_path), progress=False, sinks=("tensorboard",))
    (teacher,) = run_sweep(tiny_sweep().plan()[:1], env)
    events = accumulator.EventAccumulator(str(env.store.root / "tensorboard" / teacher.run_id))
    events.Reload()
    assert [e.value for e in events.Scalars("top1")] == pytest.approx([e["top1"] for e in teacher.epochs])


def test_wandb_sink_runs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env = RunEnv(_store(tmp_path), progress=False, sinks=("wandb",))
    (teacher,) = run_sweep(tiny_sweep().plan()[:1], env)
    runs = list((env.store.root / "wandb").glob(f"offline-run-*-{teacher.run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def _store(tmp_path):
    from kdbench.results import ResultsStore

    return ResultsStore(tmp_path / "results")
