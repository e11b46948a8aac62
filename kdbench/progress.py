"""Live progress: one line per run event and per epoch on the ``kdbench`` logger, and optional metric sinks.

Batch schedulers redirect output to files, where progress bars turn themselves off; these lines are what a user
then sees (the CLI shows them on stderr whenever stderr is not a terminal). Sinks (TensorBoard, Weights & Biases)
receive each run's spec and its per-epoch metrics through their own libraries. Nothing here decides a number.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from kdbench.data import dataset_info
from kdbench.errors import KdbenchError
from kdbench.spec import RunSpec

log = logging.getLogger("kdbench")
SINKS = ("tensorboard", "wandb")


def rescaled_options(spec: RunSpec) -> str:
    """The run's options counted in epochs that its recipe rescaled from their official 240-epoch values (e.g.
    ``warmup_epochs 20 -> 1``), so that a user who shortened the recipe learns it: empty when none was."""
    from kdbench.methods import method_class

    cls = method_class(spec.method)
    if not cls.epoch_options:
        return ""
    args = ({}, spec.protocol, spec.teacher, spec.student)
    official, scaled = dict(cls.resolve_options(*args)), dict(cls.resolve_options(*args, spec.recipe.epochs))
    ran = dict(spec.method_options)
    return ", ".join(f"{key} {official[key]} -> {ran[key]}" for key in cls.epoch_options
                     if official[key] != scaled[key] and ran.get(key) == scaled[key])


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def epoch_images(spec: RunSpec) -> int:
    """Training images of one epoch of ``spec``: its recipe's subset, or the whole training split."""
    return spec.recipe.train_images(dataset_info(spec.dataset).train_size) or 0


@dataclass
class SweepProgress:
    """Counts of one sweep in this process, for the sweep's ETA: the training images its epochs have left times the
    seconds per image so far (a teacher's epoch on the whole training set weighs what it costs, a student's on a
    subset what it costs)."""

    runs: int
    images_left: float
    done_runs: int = 0
    images_done: float = 0.0
    seconds: float = 0.0

    @classmethod
    def of(cls, specs: list[RunSpec]) -> "SweepProgress":
        return cls(len(specs), sum(epoch_images(s) * s.recipe.epochs for s in specs if not s.pretrained))

    def eta(self) -> float | None:
        if not self.images_done:
            return None
        return self.seconds / self.images_done * max(self.images_left, 0.0)


class Sink(Protocol):
    def epoch(self, row: dict[str, float]) -> None: ...
    def close(self) -> None: ...


# A run's metric sink: a name in SINKS, or a factory (spec, results root) -> Sink of the caller's own (kdbench.replay).
SinkChoice = str | Callable[[RunSpec, Path], Sink]


class TensorBoardSink:
    """Per-epoch scalars under ``<results>/tensorboard/<run_id>``, the spec as text."""

    def __init__(self, spec: RunSpec, root: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(root / "tensorboard" / spec.run_id))
        self.writer.add_text("spec", f"```\n{spec.to_dict()}\n```")

    def epoch(self, row: dict[str, float]) -> None:
        for name, value in row.items():
            if name != "epoch":
                self.writer.add_scalar(name, value, int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per kdbench run, offline unless ``WANDB_MODE`` says otherwise (sync later with `wandb sync`)."""

    def __init__(self, spec: RunSpec, root: Path):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdbench"), name=spec.run_id,
                              id=spec.run_id, resume="allow", config=spec.to_dict(), dir=str(root),
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
        # the run's epoch is the x axis (an init stage's are <= 0); a resume then overwrites, not repeats, epochs
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def epoch(self, row: dict[str, float]) -> None:
        # W&B steps must not decrease; an init stage's epochs are numbered up to 0 (harness), so they are logged as
        # the metric "epoch" over W&B's own step count
        self.run.log(dict(row))

    def close(self) -> None:
        self.run.finish()


def check_sinks(names: tuple[str, ...]) -> None:
    """One clear error before anything runs when a sink is unknown or its library is not installed."""
    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in names:
        if name not in SINKS:
            raise KdbenchError(f"unknown --log {name!r}; valid: {', '.join(SINKS)}")
        try:
            __import__(modules[name])
        except ImportError:
            raise KdbenchError(f"--log {name} needs the {modules[name]} package: pip install 'kdbench[log]'") from None


@dataclass
class RunLog:
    """The progress of one run: its lines, its sinks, and its share of the sweep's ETA."""

    spec: RunSpec
    root: Path
    sweep: SweepProgress | None = None
    sink_names: tuple[SinkChoice, ...] = ()
    sinks: list[Any] = field(default_factory=list)
    position: int = 0  # epochs of this run accounted for in the sweep's count
    init_epochs: int = 0  # the method's init stage, before the recipe's epochs

    @property
    def total(self) -> int:
        """Epochs this run stands for in the sweep's count; an imported checkpoint trains none (SweepProgress.of)."""
        return 0 if self.spec.pretrained else self.init_epochs + self.spec.recipe.epochs

    def _line(self, text: str) -> None:
        log.info("%s %s", self.spec.run_id, text)

    def start(self, epochs_done: int, init_epochs: int = 0) -> None:
        """``epochs_done``: init and main epochs a resumed run has; ``init_epochs``: its init stage's length."""
        self.init_epochs = init_epochs
        if self.sweep is not None:  # the plan priced the recipe's epochs only
            self.sweep.images_left += init_epochs * epoch_images(self.spec)
        main = self.spec.recipe.epochs
        stage = f"{init_epochs} init + " if init_epochs else ""
        if not epochs_done:
            rescaled = rescaled_options(self.spec)
            scaled = f"; scaled to the recipe's {main} epochs: {rescaled}" if rescaled else ""
            self._line(f"starts ({stage}{main} epochs{scaled})")
        elif epochs_done < init_epochs:
            self._line(f"resumes in its init stage, {init_epochs - epochs_done} init epochs to go")
        else:
            self._line(f"resumes at epoch {epochs_done + 1 - init_epochs}/{main}")
        self._advance(epochs_done)
        factories = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
        self.sinks = [(factories[n] if isinstance(n, str) else n)(self.spec, self.root) for n in self.sink_names]

    def _advance(self, epochs: int, seconds: float | None = None) -> None:
        self.position += epochs
        if self.sweep is not None:
            images = epochs * epoch_images(self.spec)
            self.sweep.images_left -= images
            if seconds is not None:
                self.sweep.images_done += images
                self.sweep.seconds += seconds

    def epoch(self, row: dict[str, float], images: int) -> None:
        """After each epoch: its line (loss, top-1, training img/s, ETAs) and its metrics to the sinks."""
        main, done = self.spec.recipe.epochs, int(row["epoch"])
        seconds = row["epoch_s"] + row["eval_s"]
        self._advance(1, seconds)
        where = f"epoch {done}/{main}" if done >= 1 else f"init epoch {done + self.init_epochs}/{self.init_epochs}"
        top1 = f" top1 {row['top1']:.2f}" if "top1" in row else ""  # not every epoch is evaluated (eval_every)
        text = (f"{where} loss {row['loss']:.4f}{top1} "
                f"{images / row['epoch_s']:.1f} img/s ETA run {duration(seconds * (main - done))}")
        if self.sweep is not None:
            text += f" sweep {duration(self.sweep.eta())}"
        self._line(text)
        for sink in self.sinks:
            sink.epoch(row)

    def end(self, status: str, detail: str = "") -> None:
        """Finished, failed or skipped (``detail`` says why); closes the sinks."""
        self._advance(self.total - self.position)
        if self.sweep is not None:
            self.sweep.done_runs += 1
        counter = f"[{self.sweep.done_runs}/{self.sweep.runs}] " if self.sweep is not None else ""
        self._line(f"{counter}{status}" + (f": {detail}" if detail else ""))
        for sink in self.sinks:
            sink.close()
        self.sinks = []
