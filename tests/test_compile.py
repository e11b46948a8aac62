"""``--compile``: the student and the frozen models compiled in place (torch.compile); a setting of its own, so its
runs have their own ids, and the same training as eager up to float reassociation. ``--channels-last`` in fp32 alike:
other kernels, the same training up to reassociation."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_sweep
from torch._dynamo.utils import counters

from kdbench.cli import main
from kdbench.estimate import _untrained
from kdbench.harness import RunEnv, _assemble, _dataset, _train_epoch
from kdbench.loader import DeviceLoader
from kdbench.measure import StepTimer
from kdbench.results import ResultsStore
from kdbench.spec import _set_fields

CPU = torch.device("cpu")


def _one_step(tmp_path, **setting):
    """Student parameters and losses after one fitnet step (its hint comes through the feature hooks)."""
    recipe = TINY.overridden(train_subset=32)
    (spec,) = [s for s in tiny_sweep(methods=("fitnet",), recipe=recipe, **setting).plan() if s.role == "student"]
    data = _dataset("synthetic", None, True)
    parts = _assemble(spec, RunEnv(ResultsStore(tmp_path / spec.run_id)), data, CPU, frozen=_untrained)
    loader = DeviceLoader(data, CPU, batch_size=recipe.batch_size, train_subset=32, channels_last=spec.channels_last)
    metrics = _train_epoch(parts, loader, spec, 0, StepTimer(CPU, 0), False)
    return spec, parts.student, metrics


def _assert_trains_alike(model, metrics, reference, reference_metrics):
    """Equal losses to 1e-5 and, after one SGD step from the same initialisation, parameters equal to 1e-4 of their
    norm: what reassociated sums in other kernels leave."""
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints and resume are unchanged
    assert metrics.keys() == reference_metrics.keys() and "loss_hint" in metrics
    for name in ("loss_ce", "loss_hint"):
        assert metrics[name] == pytest.approx(reference_metrics[name], rel=1e-5)
    diff = sum(((a - b) ** 2).sum() for a, b in zip(model.parameters(), reference.parameters())) ** 0.5
    norm = sum((a ** 2).sum() for a in reference.parameters()) ** 0.5
    assert diff / norm < 1e-4


@pytest.mark.slow
def test_a_compiled_step_trains_as_the_eager_one(tmp_path):
    eager_spec, eager, eager_metrics = _one_step(tmp_path)
    counters["stats"].clear()
    spec, compiled, metrics = _one_step(tmp_path, compile="default")
    assert counters["stats"]["unique_graphs"] >= 2  # the student's and the teacher's forwards went through Dynamo
    assert spec.run_id != eager_spec.run_id and spec.compile == "default"
    _assert_trains_alike(compiled, metrics, eager, eager_metrics)


def test_a_channels_last_step_trains_as_the_contiguous_one(tmp_path):
    plain_spec, plain, plain_metrics = _one_step(tmp_path)
    spec, model, metrics = _one_step(tmp_path, channels_last=True)
    assert spec.run_id != plain_spec.run_id
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    _assert_trains_alike(model, metrics, plain, plain_metrics)


def test_compile_is_in_the_run_id_only_when_set():
    eager = tiny_sweep(methods=("kd",)).plan()
    assert all(s.compile is None and "compile" not in _set_fields(s.to_dict()) for s in eager)  # ids as before
    compiled = tiny_sweep(methods=("kd",), compile="max-autotune").plan()
    assert {s.compile for s in compiled} == {"max-autotune"}  # teachers too: the setting is the sweep's
    assert not {s.run_id for s in eager} & {s.run_id for s in compiled}


def test_an_unknown_compile_mode_is_one_line_and_nothing_written(tmp_path, capsys):
    code = main(["run", "--methods", "kd", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--device", "cpu",
                 "--compile", "fastest", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown compile mode 'fastest'" in err[0] and "max-autotune" in err[0]
    assert not (tmp_path / "r").exists()
