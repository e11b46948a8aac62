"""Checks that need a CUDA GPU; skipped elsewhere (see conftest)."""

import pytest
import torch
from conftest import tiny_sweep

from kdbench.data import load_dataset
from kdbench.harness import run_sweep
from kdbench.loader import DeviceLoader

pytestmark = pytest.mark.gpu


def test_device_loader_on_cuda_matches_cpu():
    data = load_dataset("synthetic")
    cpu, gpu = (DeviceLoader(data, d, batch_size=64, channels_last=True) for d in ("cpu", "cuda"))
    for (xc, yc), (xg, yg) in zip(cpu.train_epoch(3, 1), gpu.train_epoch(3, 1)):
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("bf16", True)])
def test_cuda_sweep_records_gpu_measurements(env, precision, channels_last):
    records = run_sweep(tiny_sweep(methods=("student",), device="cuda", precision=precision,
                                   channels_last=channels_last).plan(), env)
    assert [r.status for r in records] == ["finished", "finished"]
    for record in records:
        m = record.metrics
        assert m["peak_alloc_bytes"] > 0 and m["peak_reserved_bytes"] >= m["peak_alloc_bytes"]
        assert m["train_images_per_s"] > 0 and record.provenance["device_type"] == "cuda"
        assert record.provenance["cuda_version"]
    assert records[0].metrics["top1_best"] > 30  # learns on the separable synthetic data
