"""Shared fixtures: a tiny recipe and sweep on the generated `synthetic` dataset, CPU only."""

from __future__ import annotations

import pytest
import torch

from kdbench.harness import RunEnv
from kdbench.results import ResultsStore
from kdbench.spec import Pair, Recipe, SweepSpec

TINY = Recipe("tiny", epochs=3, batch_size=32, warmup_steps=2)


def tiny_sweep(methods=("student",), pair=("resnet14", "resnet8"), seeds=(0,), **changes) -> SweepSpec:
    return SweepSpec(methods=tuple(methods), pairs=(Pair(*pair),), seeds=tuple(seeds), dataset="synthetic",
                     recipe=changes.pop("recipe", TINY), device="cpu", **changes)


@pytest.fixture
def env(tmp_path) -> RunEnv:
    return RunEnv(ResultsStore(tmp_path / "results"), progress=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
