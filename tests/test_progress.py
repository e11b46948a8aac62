"""Live progress: a line per run event and per epoch, and the TensorBoard and W&B sinks."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_sweep

from kdbench.harness import RunEnv, run_sweep


@pytest.mark.slow
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


@pytest.mark.slow
def test_an_init_stage_gets_its_lines_and_the_sweep_eta_weighs_images(env, caplog):
    import probe_methods  # noqa: F401  (probe-init: 2 init epochs)

    from kdbench.progress import SweepProgress
    from kdbench.spec import Recipe

    teacher, spec = tiny_sweep(methods=("probe-init",)).plan()
    with caplog.at_level(logging.INFO, logger="kdbench"):
        run_sweep([teacher, spec], env)
    mine = [r.getMessage().removeprefix(spec.run_id + " ") for r in caplog.records
            if r.getMessage().startswith(spec.run_id)]
    assert mine[0] == "starts (2 init + 3 epochs)"
    assert [line.split(" loss ")[0] for line in mine[1:6]] == [
        "init epoch 1/2", "init epoch 2/2", "epoch 1/3", "epoch 2/3",
        "epoch 3/3"]
    # an epoch's weight is its training images: 640 for the whole synthetic set, 64 for a 64-image subset
    small = tiny_sweep(recipe=Recipe("small", epochs=3, train_subset=64)).plan()
    assert SweepProgress.of(tiny_sweep().plan()).images_left == 10 * SweepProgress.of(small).images_left > 0


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


@pytest.mark.slow
def test_a_resumed_run_and_a_failed_one_say_so(env, monkeypatch, caplog):
    import probe_methods  # noqa: F401  (probe-nan: a non-finite loss)
    from conftest import run_interrupted

    specs = tiny_sweep(methods=("kd", "probe-nan")).plan()
    teacher = next(s for s in specs if s.role == "teacher")
    assert specs[0] == teacher
    run_interrupted(monkeypatch, specs, env, at_evaluation=2)  # in the teacher's second epoch
    with caplog.at_level(logging.INFO, logger="kdbench"):
        run_sweep(specs, env)
    lines = [r.getMessage() for r in caplog.records]
    assert f"{teacher.run_id} resumes at epoch 2/3" in lines
    nan = next(s for s in specs if s.method == "probe-nan")
    assert any(line.startswith(f"{nan.run_id} [") and " failed: RunFailed: non-finite training loss" in line
               for line in lines)
