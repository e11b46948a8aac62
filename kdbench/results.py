"""The results store: one folder per run, and a tidy long-format table over all runs.

``<results>/<run_id>/`` holds ``spec.json``, ``record.json`` (status, run-level metrics, per-epoch
history, provenance), ``metrics.parquet`` (that run's tidy rows), ``latest.pt`` while the run is in
progress (full training state for resume) and ``model.pt`` when it finished. ``<results>/metrics.parquet``
(+ ``metrics.csv``) concatenates every run's rows: one row per (run, metric, epoch).

Many processes may share one results dir (two shells, many Ray workers, teammates): every write is atomic and
made with the process's umask, a run is trained only under its lock (``claim``), the table is rebuilt under a lock
of its own, and a file that cannot be read is set aside (renamed, never deleted) so that its run is made again.
A finished run without weights (a committed set: weights are not in git) is still finished; it is made again only
when a run of the sweep needs its weights (kdbench.reuse.weights_to_remake), its old record set aside.
Locks are ``flock``s (filelock): the kernel drops them when their process dies, so none outlives a killed run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
import torch
from filelock import FileLock, Timeout

from kdbench.errors import KdbenchError
from kdbench.spec import RunSpec

log = logging.getLogger("kdbench")

TABLE_NAME = "metrics"
LOCKS = ".locks"  # under the results root: one lock file per run, and one for the table
DISK_FULL_MARGIN = 64 << 20  # a write that fails with less free space than this is reported as a full disk
# Per-epoch metrics evaluated on the test split; everything else per epoch is about training.
_TEST_METRICS = {"top1", "top5", "top1_best", "top1_last", "top5_best", "top5_last", "teacher_top1",
                 "teacher_top5", "eval_images_per_s", "eval_s", "top1_at_best_val"}
_VAL_METRICS = {"val_top1", "val_top5", "val_top1_best", "val_top1_last"}
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
        preset = dict(method_class(spec.method).resolve_options({}, spec.protocol, spec.teacher, spec.student,
                                                                spec.recipe.epochs))
        identity = {
            "run_id": self.run_id, "status": self.status, "error": self.error, "role": spec.role,
            "method": spec.method, "method_family": method_class(spec.method).family,
            "method_options": options_text(spec.method_options),
            # what the user set against the preset, in the kdbench that ran it: report labels show it
            "method_overrides": options_text((k, v) for k, v in spec.method_options if preset.get(k) != v),
            "dataset": spec.dataset, "teacher": spec.teacher, "student": spec.student,
            "pair": spec.pair, "assistants": ":".join(spec.assistants) or None,
            "protocol": spec.protocol, "recipe": spec.recipe.name, "seed": spec.seed,
            "epochs": spec.recipe.epochs, "batch_size": spec.recipe.batch_size,
            "train_subset": spec.recipe.train_subset, "test_subset": spec.recipe.test_subset,
            "val_split": spec.recipe.val_split,
            "lr": spec.recipe.lr,  # None: the model's default
            "precision": spec.precision,
            "channels_last": spec.channels_last, "compile": spec.compile, "device": spec.device,
            "data_backend": spec.data_backend, "world_size": spec.world_size, "sync_bn": spec.sync_bn,
            "teacher_run": spec.teacher_run, "assistant_runs": ":".join(spec.assistant_runs) or None,
            "teacher_seed": spec.seed if spec.role == "teacher" else None,  # a taught run's: its provenance's
            # scalars only: the per-module code hashes (code_files) stay in record.json
            **{k: v for k, v in self.provenance.items() if not isinstance(v, dict)},
        }
        rows = [{"metric": name, "value": value, "epoch": None, "split": _split_of(name, "na")}
                for name, value in self.metrics.items()]
        for epoch in self.epochs:
            for name, value in epoch.items():
                if name != "epoch":
                    rows.append({"metric": name, "value": value, "epoch": epoch["epoch"],
                                 "split": _split_of(name, "train")})
        frame = pd.DataFrame(rows, columns=["metric", "value", "epoch", "split"])
        frame["unit"] = frame["metric"].map(unit_of)
        frame["epoch"] = frame["epoch"].astype("Int64")
        frame["value"] = frame["value"].astype("float64")
        for key, value in reversed(identity.items()):
            frame.insert(0, key, [value] * len(frame))
        return frame


def _split_of(metric: str, otherwise: str) -> str:
    """The data split a metric is measured on: test, val (the held-out validation split), or ``otherwise``."""
    return "test" if metric in _TEST_METRICS else "val" if metric in _VAL_METRICS else otherwise


def options_text(options: Iterable[tuple[str, Any]]) -> str:
    """``k=v,k2=v2``: how options are written into results rows (kdbench.report parses it back)."""
    return ",".join(f"{k}={v}" for k, v in options)


class DamagedRun(Exception):
    """A run folder's file that cannot be read (reported, and with repair set aside)."""


class DiskFull(KdbenchError):
    """No space left where results are written: the sweep stops; it resumes once space is freed."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(path: Path, error: BaseException) -> DiskFull | None:
    """The one-line error for a write that failed because the disk is full (torch reports it in its own words)."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    try:
        full = full or shutil.disk_usage(path.parent).free < DISK_FULL_MARGIN
    except OSError:
        pass
    if not full:
        return None
    return DiskFull(f"no space left on the device holding {path.parent} (writing {path.name}); "
                    "free some space and run the same command again: it resumes where it stopped")


def _error_text(error: BaseException) -> str:
    """An exception's message on one line, cut to 120 characters (torch's can run to pages)."""
    return " ".join(str(error).split())[:120]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes through a temporary file in the same folder, then renames: readers never see half a file. The file gets
    the permissions of a plain ``open`` under the process's umask (mkstemp's are 0600), so teammates can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as error:
        # judged before the partial file is removed: its bytes are what filled the disk
        full = _disk_full(path, error) if isinstance(error, Exception) else None
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise


def remove_temp_files(folder: Path) -> None:
    """Deletes the temporary files that killed writers left in ``folder`` (call it holding the folder's lock)."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


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

    def _lock(self, name: str) -> FileLock:
        (self.root / LOCKS).mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / LOCKS / f"{name}.lock", mode=0o666 & ~_umask())

    @contextmanager
    def claim(self, run_id: str, wait: bool = True) -> Iterator[bool]:
        """Holds run ``run_id``'s lock for the ``with`` block, so no other process trains it meanwhile. Yields
        False at once when another process holds it and ``wait`` is False; else waits for it. Temp files that a
        killed writer left in the run folder are removed once the lock is held."""
        lock = self._lock(run_id)
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            yield False
            return
        try:
            if self.run_dir(run_id).is_dir():
                remove_temp_files(self.run_dir(run_id))
            yield True
        finally:
            lock.release()

    def set_aside(self, path: Path, problem: str, say: bool = True, why: str = "damaged",
                  then: str = "its run will be made again") -> Path:
        """Renames a file that cannot be used (``why``: damaged) or is replaced (remade) to ``<name>.<why>-<time>``
        (never deletes it) and says so, and what happens ``then``."""
        aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.replace(path, aside)
        if say:
            log.warning("%s: %s; set aside as %s, %s", path, problem, aside.name, then)
        return aside

    def load_record(self, run_id: str, repair: bool = True) -> RunRecord | None:
        """The run's record, or None when it has none. An unreadable record raises DamagedRun, or with ``repair``
        is set aside (None is returned: the run is made again)."""
        path = self.run_dir(run_id) / "record.json"
        try:
            return RunRecord.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:  # truncated, garbled, or not a record
            problem = f"unreadable record ({type(error).__name__})"
            if not repair:
                raise DamagedRun(f"{path}: {problem}") from None
            self.set_aside(path, problem)
            return None

    def load_torch(self, path: Path, what: str, **kwargs: Any) -> Any | None:
        """``torch.load`` of a checkpoint the harness wrote; a damaged one is set aside and None returned."""
        try:
            return torch.load(path, **kwargs)
        except FileNotFoundError:
            return None
        except Exception as error:  # truncated zip, bad pickle: torch raises many types
            self.set_aside(path, f"unreadable {what} ({_error_text(error)})")
            return None

    def weights_problem(self, record: RunRecord) -> str | None:
        """What is wrong with a finished run's weights (None: intact, their sha256 is the record's; a record made
        before kdbench stored it: the weights load). Weights that are missing are no problem: the record is still a
        result, and its run is made again only for a run that needs the weights. Reads only."""
        path = self.weights_path(record.run_id)
        if not path.is_file():
            return None
        expected = record.provenance.get("weights_sha256")
        if expected is not None:
            return None if sha256_file(path, "weights") == expected else \
                "damaged (their sha256 differs from the record's)"
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated zip, bad pickle: torch raises many types
            return f"unreadable ({_error_text(error)})"
        return None

    def finished_record(self, run_id: str, repair: bool = True) -> RunRecord | None:
        """The run's record if it finished and its weights are intact or missing (``weights_problem``); else None. A
        finished run whose weights are damaged is set aside, record and weights, to be made again; with ``repair``
        False nothing is set aside (an unreadable record gives None too)."""
        try:
            record = self.load_record(run_id, repair)
        except DamagedRun:
            return None
        if record is None or record.status != "finished":
            return None
        problem = self.weights_problem(record)
        if problem is None:
            return record
        if not repair:
            return None
        path = self.weights_path(run_id)
        aside = f"; weights set aside as {self.set_aside(path, '', say=False).name}" if path.is_file() else ""
        self.set_aside(self.run_dir(run_id) / "record.json", f"the run's weights are {problem}{aside}")
        return None

    def is_finished(self, run_id: str) -> bool:
        return self.finished_record(run_id) is not None

    def chosen_runs(self, patterns: str) -> list[str]:
        """The runs with a record here whose ids match ``patterns`` (comma-separated ids or shell patterns: the
        ``--runs`` of ``kdbench replay`` and ``kdbench costs``)."""
        import fnmatch

        if not self.root.is_dir():
            state = "is a file" if self.root.exists() else "does not exist"
            raise KdbenchError(f"results directory {self.root} {state}; give the folder that `kdbench run "
                               f"--results-dir` wrote")
        folders = sorted(p.name for p in self.root.iterdir() if (p / "record.json").is_file())
        names = [name.strip() for name in patterns.split(",") if name.strip()]
        chosen = [run_id for run_id in folders if any(fnmatch.fnmatchcase(run_id, name) for name in names)]
        if not chosen:
            raise KdbenchError(f"no run in {self.root} matches --runs {patterns}; runs there: "
                               f"{', '.join(folders[:5]) or 'none'}{' ...' if len(folders) > 5 else ''}")
        return chosen

    def write_spec(self, spec: RunSpec) -> None:
        text = json.dumps(spec.to_dict(), indent=2, sort_keys=True)
        atomic_write(self.run_dir(spec.run_id) / "spec.json", lambda p: p.write_text(text))

    def write_record(self, record: RunRecord) -> None:
        run_dir = self.run_dir(record.run_id)
        atomic_write(run_dir / f"{TABLE_NAME}.parquet", lambda p: record.tidy().to_parquet(p, index=False))
        text = json.dumps(record.to_dict(), indent=2, default=_json_default)
        atomic_write(run_dir / "record.json", lambda p: p.write_text(text))

    def save_torch(self, path: Path, obj: Any) -> None:
        """``torch.save`` through an open file: the archive inside is then named "archive", not after the temporary
        file, so equal weights give equal bytes and sha256 (a run re-made for its weights is compared by it)."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as file:
                torch.save(obj, file)

        atomic_write(path, write)

    def run_rows(self, run_id: str, repair: bool = True) -> pd.DataFrame | None:
        """The tidy rows of a run with a record (None without one). Damaged rows are set aside and written again
        from the record, or with ``repair`` False made from it in memory; an unreadable record raises DamagedRun
        (``repair`` False) or is set aside (None)."""
        record = self.load_record(run_id, repair)
        if record is None:
            return None
        path = self.run_dir(run_id) / f"{TABLE_NAME}.parquet"
        try:
            return pd.read_parquet(path)
        except FileNotFoundError:
            pass
        except Exception as error:  # pyarrow's ArrowInvalid and kin
            if repair:
                self.set_aside(path, f"unreadable rows ({type(error).__name__})",
                               then="the rows are written again from record.json; the run stays as it is")
        if not repair:
            return record.tidy()
        self.write_record(record)
        return pd.read_parquet(path)

    def read_table(self, repair: bool = True) -> tuple[pd.DataFrame, list[str]]:
        """Every run of this directory (folders with a record), read from the run folders, and a line for each run
        that could not be counted (its record is unreadable; with ``repair`` it is set aside, to be made again). A
        result set nested inside this directory is another set, never pooled."""
        rows, not_counted = [], []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (folder / "record.json").is_file():
                aside = sorted(folder.glob("record.json.*-*"))  # damaged, or a run being made again for its weights
                if aside:  # set aside, and its run not made again yet (killed, or the disk was full)
                    not_counted.append(f"{folder / aside[-1].name}: its record was set aside and the run has not "
                                       "been made again yet")
                continue
            try:
                frame = self.run_rows(folder.name, repair)
            except DamagedRun as error:
                not_counted.append(str(error))
                continue
            if frame is None:  # its record was unreadable and is now set aside
                not_counted.append(f"{folder / 'record.json'}: unreadable record, set aside")
                continue
            rows.append(frame)
        return (pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()), not_counted

    def discard(self, path: Path) -> None:
        """Removes a run's file or folder that is no longer wanted (a finished run's resume checkpoint, artefacts
        fitted for weights that were replaced)."""
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def rebuild_table(self) -> pd.DataFrame:
        """Writes ``metrics.parquet`` and ``metrics.csv`` at the root from the run folders, under the table's lock
        (so concurrent rebuilds never interleave) and atomically (so readers never see a partial file)."""
        with self._lock("table"):
            remove_temp_files(self.root)
            table, _ = self.read_table()
            atomic_write(self.root / f"{TABLE_NAME}.parquet", lambda p: table.to_parquet(p, index=False))
            atomic_write(self.root / f"{TABLE_NAME}.csv", lambda p: table.to_csv(p, index=False))
        return table


def sha256_file(path: str | Path, what: str = "file") -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise KdbenchError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return digest.hexdigest()


class FollowerStore(ResultsStore):
    """The store as a process of a run trained by several sees it (kdbench.distributed): it reads what rank 0
    wrote and writes nothing, and takes no claim (rank 0 holds the run's for the group)."""

    @contextmanager
    def claim(self, run_id: str, wait: bool = True) -> Iterator[bool]:
        yield True

    def set_aside(self, path: Path, problem: str, say: bool = True, why: str = "damaged",
                  then: str = "its run will be made again") -> Path:
        return path

    def write_spec(self, spec: RunSpec) -> None:
        pass

    def write_record(self, record: RunRecord) -> None:
        pass

    def save_torch(self, path: Path, obj: Any) -> None:
        pass

    def discard(self, path: Path) -> None:
        pass

    def rebuild_table(self) -> pd.DataFrame:
        return pd.DataFrame()
