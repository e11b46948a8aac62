"""Shared fixtures: a tiny recipe and sweep on the generated `synthetic` dataset, CPU only."""

from __future__ import annotations

import os

import pytest
import torch

from kdbench import harness
from kdbench.harness import RunEnv, run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import MethodContext, StepOutputs
from kdbench.results import ResultsStore
from kdbench.spec import Pair, Recipe, SweepSpec

TINY = Recipe("tiny", epochs=3, batch_size=32, warmup_steps=2)

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # test files in parallel (setup.cfg): the cores shared out
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _own_price_cache(tmp_path, monkeypatch):
    """Each test prices dry runs afresh: the CLI's price cache (kdbench.estimate.PriceCache) in its own folder."""
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))


def tiny_sweep(methods=("student",), pair=("resnet14", "resnet8"), seeds=(0,), **changes) -> SweepSpec:
    return SweepSpec(methods=tuple(methods), pairs=(Pair(*pair),), seeds=tuple(seeds),
                     dataset=changes.pop("dataset", "synthetic"),
                     recipe=changes.pop("recipe", TINY), device=changes.pop("device", "cpu"), **changes)


def method_context(method, student_shapes, teacher_shapes, protocol="semckd", options=None, batch_size=64,
                   num_classes=100, **rest) -> MethodContext:
    """A method's context with its options resolved as a sweep does: defaults, the protocol's preset, ``options``."""
    resolved = dict(method_class(method).resolve_options(options or {}, protocol))
    return MethodContext(student_shapes, teacher_shapes, protocol, batch_size, num_classes, resolved, **rest)


def step(method, student_features, teacher_features, batch, seed=0) -> StepOutputs:
    """A training step's outputs around given features: random labels and 100-class logits."""
    g = torch.Generator().manual_seed(seed)
    return StepOutputs(torch.randint(0, 100, (batch,), generator=g), torch.randn(batch, 100, generator=g),
                       student_features, torch.randn(batch, 100, generator=g), teacher_features)


def random_features(method, batch, seed=0, requires_grad=False):
    """Random (student, teacher) features of ``method``'s taps, shaped by its context."""
    g = torch.Generator().manual_seed(seed)

    def draw(tap_shapes, taps):
        return {n: torch.randn(batch, *tap_shapes[n], generator=g).requires_grad_(requires_grad) for n in taps}

    return draw(method.ctx.student_shapes, method.student_taps), draw(method.ctx.teacher_shapes, method.teacher_taps)


def run_interrupted(monkeypatch, specs, env, at_evaluation: int) -> None:
    """Runs ``specs`` until the ``at_evaluation``-th call of the harness's evaluate (1-based: a teacher's epochs,
    a student's teacher check, then its epochs), which raises KeyboardInterrupt as a kill between a checkpoint and
    the next would; evaluate is restored afterwards."""
    real, calls = harness.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_evaluation:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(specs, env)
    monkeypatch.setattr(harness, "evaluate", real)


@pytest.fixture
def env(tmp_path) -> RunEnv:
    return RunEnv(ResultsStore(tmp_path / "results"), progress=False)


def pytest_collection_modifyitems(config, items):
    # Files with slow (end-to-end) tests first: parallel workers take whole files (setup.cfg), so the long files start
    # early and the suite ends on short tests. The sort is stable: the order within a file is kept.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
