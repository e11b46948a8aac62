"""--runs-per-gpu (kdbench.packing): the memory check, the refusals and the dry run's price. The scheduling itself,
runs at once on a fake GPU, is tested with Ray's cluster in test_ray.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_sweep

from kdbench import packing
from kdbench.errors import KdbenchError
from kdbench.estimate import Estimate, RunEstimate, estimate
from kdbench.harness import RunEnv
from kdbench.results import ResultsStore

GIB = 2**30
H100 = 80 * GIB


def test_runs_are_packed_as_many_as_fit_beside_their_cuda_contexts():
    # 0.95 x 80 GiB = 76 GiB usable; a 10 GiB peak needs 11 GiB with its context: 6 fit
    assert packing.runs_that_fit(10 * GIB, H100, 8) == 6
    assert packing.runs_that_fit(10 * GIB, H100, 4) == 4
    assert packing.runs_that_fit(2 * GIB, H100, 8) == 8
    assert packing.runs_that_fit(75.5 * GIB, H100, 8) == 0
    packed = packing.shares({"small": 2 * GIB, "large": 30 * GIB}, H100, 4)
    assert packed == {"small": 4, "large": 2}
    assert packing.packing_lines({"small": 2 * GIB, "large": 30 * GIB}, packed, 4) == [
        "large: 2 per GPU, not 4 (measured peak 30.0 GiB + 1 GiB of CUDA context each)"]
    assert packing.shares({"a": 100 * GIB}, None, 4) == {"a": 4}  # no device memory to check (CPU runs)


def test_a_run_that_does_not_fit_alone_is_refused_in_one_line():
    with pytest.raises(KdbenchError) as refused:
        packing.shares({"ok": GIB, "huge": 90 * GIB, "huger": 99 * GIB}, H100, 2)
    message = str(refused.value)
    assert message == ("run huge measured a peak of 90.0 GiB, which with its CUDA context does not fit the GPU's "
                       "80.0 GiB even alone (and 1 more runs)")


@pytest.mark.parametrize("runs, device, world, message", [
    (0, "cuda", 1, "--runs-per-gpu must be a positive integer, got 0"),
    (2, "cpu", 1, "--runs-per-gpu 2 shares a GPU, but the runs are on cpu"),
    (2, "cuda", 2, "--runs-per-gpu 2 with --gpus-per-run 2: a run trained by several processes takes whole GPUs"),
])
def test_settings_that_cannot_be_packed_are_refused(runs, device, world, message):
    with pytest.raises(KdbenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        packing.check(runs, device, world)
    packing.check(1, device, world)  # one run per GPU is always the default


def test_the_dry_run_prices_a_packed_sweep_between_free_and_no_sharing(monkeypatch):
    monkeypatch.setattr(packing, "device_capacity", lambda device: H100)
    rows = tuple(RunEstimate(f"r{i}", "student", "kd", "a->b", "train", 240, 3600.0, peak_bytes=peak)
                 for i, peak in enumerate([GIB, GIB, 30 * GIB]))
    est = Estimate(rows + (RunEstimate("done", "student", "kd", "a->b", "cached", 0, 0.0),), 2, 5, ("cuda",))
    text = packing.dry_run_text(est, 4)
    # 3 GPU-hours alone; shared: 1/4 + 1/4 + 1/2 (the 30 GiB run packs 2 to a GPU)
    assert text.startswith("\n\npacked 4 runs per GPU: between 1 GPU-hours (if sharing cost each run nothing) and 3 ")
    assert text.endswith("\npacked fewer: r2: 2 per GPU, not 4 (measured peak 30.0 GiB + 1 GiB of CUDA context each)")
    assert packing.dry_run_text(est, 1) == ""


def test_the_dry_run_measures_each_settings_peak_memory(tmp_path):
    specs = tiny_sweep(methods=("kd",)).plan()
    runs = estimate(specs, RunEnv(ResultsStore(tmp_path), progress=False), steps=2).runs
    assert all(r.peak_bytes > 2**20 for r in runs)  # set (0 by default): the CPU's peak RSS here, CUDA's on a GPU


def test_a_sweep_is_packed_from_its_measured_peaks_beside_this_processs_own_context(tmp_path, monkeypatch):
    specs = tiny_sweep(methods=("kd",)).plan()
    rows = tuple(RunEstimate(s.run_id, s.role, s.method, "", "train", 1, 1.0, peak_bytes=2 * GIB) for s in specs)
    monkeypatch.setattr("kdbench.estimate.estimate", lambda *args, **kwargs: Estimate(rows, 1, 5, ("cuda",)))
    monkeypatch.setattr(packing, "device_capacity", lambda device: 10 * GIB)
    env = RunEnv(ResultsStore(tmp_path), progress=False)
    # 0.95 x (10 - 1) GiB over 2 + 1 GiB a run: 2 fit (3 would, were this process's context not on the GPU)
    assert packing.pack(specs, env, 8) == {s.run_id: 2 for s in specs}
    assert packing.runs_that_fit(2 * GIB, 10 * GIB, 8) == 3

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("kdbench.estimate.estimate", out_of_memory)
    with pytest.raises(KdbenchError, match="ran out of GPU memory: a setting does not fit the GPU even alone"):
        packing.pack(specs, env, 2)
