"""``--compile``: the student and the frozen models compiled in place (torch.compile); a setting of its own, so its
runs have their own ids, and the same training as eager up to float reassociation. ``--channels-last`` in fp32 alike:
other kernels, the same training up to reassociation."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_sweep
from torch._dynamo.utils import counters

from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.estimate import _untrained
from kdbench.harness import RunEnv, _assemble, _dataset, _train_epoch
from kdbench.loader import DeviceLoader
from kdbench.measure import StepTimer
from kdbench.results import ResultsStore
from kdbench.spec import _set_fields

CPU = torch.device("cpu")


def _one_step(tmp_path, method="fitnet", device=CPU, steps=1, **setting):
    """Student parameters and losses after ``steps`` steps of ``method`` (fitnet's hint comes through the feature
    hooks) from a fixed initialisation, with an untrained teacher."""
    recipe = TINY.overridden(train_subset=32 * steps)
    (spec,) = [s for s in tiny_sweep(methods=(method,), recipe=recipe, device=device.type, **setting).plan()
               if s.role == "student"]
    data = _dataset("synthetic", None, True)
    parts = _assemble(spec, RunEnv(ResultsStore(tmp_path / spec.run_id)), data, device, frozen=_untrained)
    loader = DeviceLoader(data, device, batch_size=recipe.batch_size, train_subset=32 * steps,
                          channels_last=spec.channels_last)
    metrics = _train_epoch(parts, loader, spec, 0, StepTimer(device, 0), False)
    return spec, parts.student, metrics


def _assert_trains_alike(model, metrics, reference, reference_metrics):
    """Equal losses to 1e-5 and, after SGD steps from the same initialisation, parameters equal to 1e-4 of their
    norm: what reassociated sums in other kernels leave."""
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints and resume are unchanged
    losses = [name for name in reference_metrics if name.startswith("loss_")]
    assert metrics.keys() == reference_metrics.keys() and len(losses) >= 2
    for name in losses:
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


@pytest.mark.slow
def test_a_method_compiled_after_another_in_one_process_runs_its_own_feature_taps(tmp_path):
    """Dynamo reuses a class's compiled forward for new instances: without guards on the hooks, semckd's student
    ran kd's code and had no stage maps (KeyError: 'stage1')."""
    _one_step(tmp_path, "kd", compile="default")
    _, semckd, metrics = _one_step(tmp_path, "semckd", compile="default")
    assert metrics["loss_semckd"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["kd", "fitnet", "semckd", "rkd", "mlkd"])
def test_three_steps_under_cuda_graphs_train_as_eager_ones(tmp_path, method):
    """--compile reduce-overhead on a GPU: outputs of the graphed forwards are read in their own step only, so three
    steps (each replaying the graphs of the last) train as eager ones; TF32 off on both sides."""
    cuda = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    try:
        _, eager, eager_metrics = _one_step(tmp_path, method, cuda, steps=3)
        _, compiled, metrics = _one_step(tmp_path, method, cuda, steps=3, compile="reduce-overhead")
    finally:
        torch.backends.cudnn.allow_tf32 = True
    _assert_trains_alike(compiled, metrics, eager, eager_metrics)


@pytest.mark.parametrize("method, mode, reason", [
    ("ab", "reduce-overhead", "ab cannot train under --compile reduce-overhead: its init stage steps only the feature "
                              "modules"),
    ("fsp", "max-autotune", "fsp cannot train under --compile max-autotune: its init stage steps only"),
    ("kd_dot", "default", "kd_dot cannot train under --compile default: its two backward passes"),
])
def test_methods_that_break_compile_or_cuda_graphs_are_refused_by_the_plan(method, mode, reason):
    with pytest.raises(KdbenchError, match=reason):
        tiny_sweep(methods=(method,), compile=mode).plan()
    if method != "kd_dot":  # without CUDA graphs they compile
        tiny_sweep(methods=(method,), compile="max-autotune-no-cudagraphs").plan()


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
