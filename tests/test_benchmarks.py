"""Micro-benchmarks (pytest-benchmark). CI runs them once as plain tests (--benchmark-disable in setup.cfg);
measure with `pytest tests/test_benchmarks.py --benchmark-enable`. Groups follow harness-performance.md §2."""

import pytest
import torch
import torch.nn.functional as F

from kdbench.data import load_dataset
from kdbench.loader import DeviceLoader
from kdbench.models import create_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_gather(benchmark, device):
    benchmark.group = "aug"
    loader = DeviceLoader(load_dataset("synthetic"), device, batch_size=64)
    i, j, flip = loader.aug_params(0, 0)
    idx = torch.arange(64)

    def gather():
        x = loader.augment(idx, i[idx], j[idx], flip[idx])
        _sync(device)
        return x

    x = benchmark(gather)
    benchmark.extra_info.update(batch_size=64, img_per_s=64 / benchmark.stats.stats.mean if benchmark.stats else None)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["resnet8", "vgg8"])
def test_student_training_step(benchmark, device, arch):
    benchmark.group = f"step.student.{arch}"
    torch.manual_seed(0)
    model = create_model(arch, 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        return loss.detach()

    first = F.cross_entropy(model(x), y).item()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    assert F.cross_entropy(model(x), y).item() < first  # the steps trained on the fixed batch


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_forward(benchmark, device):
    benchmark.group = "teacher_fwd.resnet32x4"
    model = create_model("resnet32x4", 100).to(device).eval()
    x = torch.randn(64, 3, 32, 32, device=device)

    @torch.no_grad()
    def forward():
        out = model(x)
        _sync(device)
        return out

    assert benchmark.pedantic(forward, rounds=3, warmup_rounds=1, iterations=1).shape == (64, 100)
