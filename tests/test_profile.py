"""`kdbench run --profile`: every setting's step split by phase, beside a fixed batch, a bare loop and the peak."""

import pandas as pd
import pytest
import torch
from conftest import tiny_sweep

from kdbench import harness, profile
from kdbench.cli import main
from kdbench.estimate import _loader
from kdbench.harness import RunEnv
from kdbench.measure import macs_per_image
from kdbench.models import create_model
from kdbench.results import ResultsStore

METRICS = {*(f"step_ms_{v}" for v in profile.VARIANTS), *(f"img_per_s_{v}" for v in profile.VARIANTS),
           *(f"phase_ms_{p}" for p in profile.PHASES), "achieved_gflops", "peak_gflops", "fraction_of_peak"}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    env = RunEnv(ResultsStore(tmp_path_factory.mktemp("profile")), progress=False)
    return profile.profile(tiny_sweep(methods=("student", "kd", "crd")).plan(), env, steps=2)


def test_one_row_per_setting_and_metric(table):
    assert list(table.method.drop_duplicates()) == ["student", "kd", "crd"]
    for _, rows in table.groupby("method"):
        assert set(rows.metric) == METRICS and len(rows) == len(METRICS)
    assert (table.value >= 0).all() and table.value.notna().all()


def test_phases_follow_what_each_step_runs(table):
    value = table.set_index(["method", "metric"]).value
    assert value["student", "phase_ms_frozen_forwards"] == 0  # the baseline forwards no teacher
    for method in ("kd", "crd"):
        assert value[method, "phase_ms_frozen_forwards"] > 0 and value[method, "phase_ms_loss"] > 0
    for method in ("student", "kd", "crd"):
        assert value[method, "phase_ms_student_forward"] > 0 and value[method, "phase_ms_backward"] > 0
        assert value[method, "peak_gflops"] > 0 and 0 < value[method, "fraction_of_peak"]


def test_the_clock_leaves_no_hook_or_wrapper_behind(tmp_path):
    spec = next(s for s in tiny_sweep(methods=("kd",)).plan() if s.method == "kd")
    env = RunEnv(ResultsStore(tmp_path), progress=False)
    built = {}
    real = harness._assemble

    def keep(*args, **kwargs):
        built["parts"] = real(*args, **kwargs)
        return built["parts"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "_assemble", keep)
        profile.profile_setting(spec, env, steps=2, peaks={("cpu", "fp32"): 1e9})
    parts = built["parts"]
    assert "losses" not in vars(parts.method)  # the class's method again
    for model in (parts.student, *parts.trainers):
        assert not model._forward_pre_hooks
    assert not parts.optimizer._optimizer_step_pre_hooks and not parts.optimizer._optimizer_step_post_hooks


def test_a_steps_flops_count_the_student_the_teacher_and_the_methods_own_modules(tmp_path):
    env, cpu = RunEnv(ResultsStore(tmp_path), progress=False), torch.device("cpu")
    flops = {}
    for method in ("student", "kd", "crd"):
        spec = next(s for s in tiny_sweep(methods=(method,)).plan() if s.role != "teacher")
        data = harness._dataset(spec.dataset, None, True)
        loader = _loader(spec, data, cpu)
        batch = next(iter(loader.train_epoch(spec.seed, 0, positions=True)))
        parts = profile._prepared(spec, env, data, cpu, loader)
        flops[method] = profile._step_flops(parts, spec, env, data, cpu, loader, batch)
    images = len(batch[1])
    student, teacher = (2 * images * macs_per_image(create_model(arch, 10, 3), data.image_shape)
                        for arch in (spec.student, spec.teacher))
    assert 2 * student < flops["student"] <= 3 * student  # forward, and a backward without the input's gradient
    assert flops["kd"] == pytest.approx(flops["student"] + teacher, rel=1e-9)  # KD adds the teacher's forward
    assert flops["crd"] > flops["kd"]  # CRD's embeddings and its scores against the memory banks


def test_fixed_batch_repeats_one_batch():
    x, y, pos = torch.zeros(2, 1), torch.tensor([1, 2]), torch.tensor([5, 6])

    class Loader:
        batch_size, device = 2, torch.device("cpu")

    fixed = profile._FixedBatch(Loader(), 3, (x, y, pos))
    assert [b[2].tolist() for b in fixed.train_epoch(0, 0, positions=True)] == [[5, 6]] * 3
    assert all(len(b) == 2 for b in fixed.train_epoch(0, 0))


def test_save_replaces_the_rows_of_a_setting_and_draws_the_plot(table, tmp_path):
    first = profile.save(table, tmp_path)
    again = table.assign(value=table.value + 1)
    profile.save(again[again.method == "kd"], tmp_path)
    stored = pd.read_parquet(first)
    assert len(stored) == len(table)
    kd = stored[stored.method == "kd"].set_index("metric").value
    assert kd.equals(again[again.method == "kd"].set_index("metric").value)
    assert (tmp_path / "profile.csv").is_file() and (tmp_path / "profile.png").stat().st_size > 0
    assert (tmp_path / "profile.svg").is_file()


def test_cli_profile_prints_the_table_and_trains_nothing(tmp_path, capsys):
    code = main(["run", "--methods", "kd", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--device", "cpu",
                 "--batch-size", "16", "--results-dir", str(tmp_path), "--profile"])
    out = capsys.readouterr().out
    assert code == 0 and "| kd " in out and "% of" in out and "profile table:" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.csv", "profile.parquet", "profile.png",
                                                         "profile.svg"]


@pytest.mark.parametrize("slower, expected", [(1.0, None), (1.1, None), (3.0, "3.0x slower than fp32")])
def test_a_slower_precision_or_layout_gets_one_measured_line(monkeypatch, slower, expected):
    monkeypatch.setattr(profile, "_conv_step_seconds",
                        lambda device, precision, channels_last: slower if (precision, channels_last) != (
                            "fp32", False) else 1.0)
    note = profile.slow_setting_note(torch.device("cpu"), "bf16", True)
    assert note is None if expected is None else (expected in note and "bf16 autocast + channels_last" in note)
    assert profile.slow_setting_note(torch.device("cpu"), "fp32", False) is None  # nothing to compare, no measure


@pytest.mark.skipif(torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has oneDNN bf16 kernels")
def test_bf16_on_a_cpu_without_onednn_bf16_names_the_slow_path(capsys, tmp_path, monkeypatch):
    """This machine's case (AVX2 only): bf16 convolutions fall back to aten::_slow_conv2d; the run says so before
    it trains (the executor is stubbed out: the line is the point, not bf16 training)."""
    import kdbench.executors

    monkeypatch.setattr(kdbench.executors, "execute", lambda *args, **kwargs: [])
    main(["run", "--methods", "student", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--device", "cpu",
          "--epochs", "1", "--train-subset", "64", "--test-subset", "64", "--amp", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "kdbench: warning: bf16 autocast trains a 3x3 convolution" in err and "aten::_slow_conv2d" in err
