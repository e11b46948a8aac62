"""Shared fixtures: a tiny recipe and sweep on the generated `synthetic` dataset, CPU only."""

from __future__ import annotations

import pytest
import torch

from kdbench.harness import RunEnv
from kdbench.methods import method_class
from kdbench.methods.base import MethodContext
from kdbench.results import ResultsStore
from kdbench.spec import Pair, Recipe, SweepSpec

TINY = Recipe("tiny", epochs=3, batch_size=32, warmup_steps=2)


def tiny_sweep(methods=("student",), pair=("resnet14", "resnet8"), seeds=(0,), **changes) -> SweepSpec:
    return SweepSpec(methods=tuple(methods), pairs=(Pair(*pair),), seeds=tuple(seeds), dataset="synthetic",
                     recipe=changes.pop("recipe", TINY), device="cpu", **changes)


def method_context(method, student_shapes, teacher_shapes, protocol="semckd", options=None, batch_size=64,
                   num_classes=100, **rest) -> MethodContext:
    """A method's context with its options resolved as a sweep does: defaults, the protocol's preset, ``options``."""
    resolved = dict(method_class(method).resolve_options(options or {}, protocol))
    return MethodContext(student_shapes, teacher_shapes, protocol, batch_size, num_classes, resolved, **rest)


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
