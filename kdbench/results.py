"""The results store: one folder per run, and a tidy long-format table over all runs.

``<results>/<run_id>/`` holds ``spec.json``, ``record.json`` (status, run-level metrics, per-epoch
history, provenance), ``metrics.parquet`` (that run's tidy rows), ``latest.pt`` while the run is in
progress (full training state for resume) and ``model.pt`` when it finished. ``<results>/metrics.parquet``
(+ ``metrics.csv``) concatenates every run's rows: one row per (run, metric, epoch). Every write is atomic.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import torch

from kdbench.spec import RunSpec

TABLE_NAME = "metrics"
# Per-epoch metrics evaluated on the test split; everything else per epoch is about training.
_TEST_METRICS = {"top1", "top5", "top1_best", "top1_last", "top5_best", "top5_last", "teacher_top1",
                 "teacher_top5", "eval_images_per_s", "eval_s"}
_UNITS = {
    "%": ("top1", "top5", "train_top1"),
    "img/s": ("images_per_s",),
    "ms": ("_ms",),
    "bytes": ("_bytes",),
    "s": ("_s",),
    "MACs": ("_macs",),
    "count": ("params", "epoch", "iters_per_epoch", "dropped_images", "train_images", "test_images",
              "frozen_forwards", "assistant_trainings"),
}


def unit_of(metric: str) -> str:
    if metric.startswith("loss"):
        return "loss"
    if metric == "lr":
        return "lr"
    for unit, markers in _UNITS.items():
        if any(metric.startswith(m) or metric.endswith(m) for m in markers):
            return unit
    return ""


@dataclass
class RunRecord:
    """What one run produced; ``status`` is running, finished or failed."""

    spec: RunSpec
    status: str
    metrics: dict[str, float] = field(default_factory=dict)  # run-level
    epochs: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch, key "epoch" 1-indexed
    provenance: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "status": self.status, "error": self.error, "spec": self.spec.to_dict(),
                "metrics": self.metrics, "epochs": self.epochs, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        return cls(RunSpec.from_dict(data["spec"]), data["status"], data["metrics"], data["epochs"],
                   data["provenance"], data["error"])

    def tidy(self) -> pd.DataFrame:
        """Long-format rows: identity and provenance repeated on every row."""
        from kdbench.methods import method_class  # methods import this module (atomic_write)

        spec = self.spec
        # what the protocol's preset and the pair's official values give, without the user's --set
        preset = dict(method_class(spec.method).resolve_options({}, spec.protocol, spec.teacher, spec.student))
        identity = {
            "run_id": self.run_id, "status": self.status, "error": self.error, "role": spec.role,
            "method": spec.method,
            "method_options": _options_text(spec.method_options),
            # what the user set against the preset, in the kdbench that ran it: report labels show it
            "method_overrides": _options_text((k, v) for k, v in spec.method_options if preset.get(k) != v),
            "dataset": spec.dataset, "teacher": spec.teacher, "student": spec.student,
            "pair": spec.pair, "assistants": ":".join(spec.assistants) or None,
            "protocol": spec.protocol, "recipe": spec.recipe.name, "seed": spec.seed,
            "epochs": spec.recipe.epochs, "batch_size": spec.recipe.batch_size,
            "train_subset": spec.recipe.train_subset, "test_subset": spec.recipe.test_subset,
            "precision": spec.precision,
            "channels_last": spec.channels_last, "device": spec.device, "teacher_run": spec.teacher_run,
            # scalars only: the per-module code hashes (code_files) stay in record.json
            **{k: v for k, v in self.provenance.items() if not isinstance(v, dict)},
        }
        rows = [{"metric": name, "value": value, "epoch": None,
                 "split": "test" if name in _TEST_METRICS else "na"}
                for name, value in self.metrics.items()]
        for epoch in self.epochs:
            for name, value in epoch.items():
                if name != "epoch":
                    rows.append({"metric": name, "value": value, "epoch": epoch["epoch"],
                                 "split": "test" if name in _TEST_METRICS else "train"})
        frame = pd.DataFrame(rows, columns=["metric", "value", "epoch", "split"])
        frame["unit"] = frame["metric"].map(unit_of)
        frame["epoch"] = frame["epoch"].astype("Int64")
        frame["value"] = frame["value"].astype("float64")
        for key, value in reversed(identity.items()):
            frame.insert(0, key, [value] * len(frame))
        return frame


def _options_text(options: Iterable[tuple[str, Any]]) -> str:
    """``k=v,k2=v2``: how options are written into results rows (kdbench.report parses it back)."""
    return ",".join(f"{k}={v}" for k, v in options)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes through a temporary file in the same folder, then renames: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class ResultsStore:
    """Reads and writes run folders under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def weights_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "model.pt"

    def checkpoint_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "latest.pt"

    def load_record(self, run_id: str) -> RunRecord | None:
        path = self.run_dir(run_id) / "record.json"
        return RunRecord.from_dict(json.loads(path.read_text())) if path.exists() else None

    def is_finished(self, run_id: str) -> bool:
        record = self.load_record(run_id)
        return record is not None and record.status == "finished"

    def write_spec(self, spec: RunSpec) -> None:
        text = json.dumps(spec.to_dict(), indent=2, sort_keys=True)
        atomic_write(self.run_dir(spec.run_id) / "spec.json", lambda p: p.write_text(text))

    def write_record(self, record: RunRecord) -> None:
        run_dir = self.run_dir(record.run_id)
        atomic_write(run_dir / f"{TABLE_NAME}.parquet", lambda p: record.tidy().to_parquet(p, index=False))
        text = json.dumps(record.to_dict(), indent=2, default=_json_default)
        atomic_write(run_dir / "record.json", lambda p: p.write_text(text))

    def save_torch(self, path: Path, obj: Any) -> None:
        atomic_write(path, lambda p: torch.save(obj, p))

    def rebuild_table(self) -> pd.DataFrame:
        """Concatenates the rows of this directory's own runs (folders with a record) into ``metrics.parquet`` and
        ``metrics.csv`` at the root; a result set nested inside it is another set, never pooled."""
        parts = [pd.read_parquet(p) for p in sorted(self.root.glob(f"*/{TABLE_NAME}.parquet"))
                 if (p.parent / "record.json").is_file()]
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        atomic_write(self.root / f"{TABLE_NAME}.parquet", lambda p: table.to_parquet(p, index=False))
        atomic_write(self.root / f"{TABLE_NAME}.csv", lambda p: table.to_csv(p, index=False))
        return table
