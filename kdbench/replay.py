"""Replays: does the current code reproduce a finished run's numbers?

A run's code fingerprint (``kdbench.fingerprint``) changes with any code edit in its closure, so a harness change
that leaves every number as it was (a new hook that the run's method does not use) would make a whole reference
set stale. A replay trains the run again with the current code, in a scratch results folder beside its teacher
and assistants (their weights as recorded), for its first ``epochs`` epochs, and compares every per-epoch number
the code decides (losses and terms, accuracies, learning rate; not the timings, the metrics ending in ``_s``) with
the record, exactly. Training is deterministic per machine and build, so a replay runs only where the run was
made: the same torch build, device and thread count.

A replay that matches is written into the run's provenance (``replays``, per fingerprint, and the latest's
``replayed_*`` columns): the sweep then keeps the run under the current code (``fingerprint.stale_reason``) and the
report counts it as the current code's, saying how many epochs were compared. A replay that differs changes
nothing and names the first number that differs.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench.errors import KdbenchError
from kdbench.fingerprint import differing_blas, fingerprint, numeric_kernels
from kdbench.results import ResultsStore, RunRecord

#: Per-epoch metrics that measure time, not what the code computed: never compared.
MEASURED_SUFFIX = "_s"
#: The provenance that must match for a replay to be meaningful here (determinism is per machine and build).
SAME_BUILD = ("torch_version", "device_name", "device_type")
#: The same for torch's CPU kernels (``fingerprint.numeric_kernels``), compared where the run recorded them (runs
#: made before kdbench recorded them did not); each BLAS that both list is compared too (``differing_blas``).
SAME_KERNELS = ("cpu_capability",)


@dataclass(frozen=True)
class Replay:
    """The outcome for one run: ``status`` reproduced, differs, current (already made by this code) or skipped."""

    run_id: str
    status: str
    epochs: int = 0  # epochs compared
    detail: str = ""

    def line(self) -> str:
        return f"{self.run_id}: {self.status}" + (f" ({self.detail})" if self.detail else "")


class _EnoughEpochs(BaseException):
    """Raised by the capturing sink once the epochs to compare are trained: the replay stops there. Not an
    Exception, so the harness does not record it as the run's failure (as KeyboardInterrupt, it passes through)."""


class _Capture:
    """A progress sink that keeps each epoch's row and stops the run after ``limit`` rows."""

    def __init__(self, limit: int):
        self.limit = limit
        self.rows: list[dict[str, float]] = []

    def __call__(self, spec, root) -> "_Capture":  # the sink factory RunLog calls at the run's start
        return self

    def epoch(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))
        if len(self.rows) >= self.limit:
            raise _EnoughEpochs

    def close(self) -> None:
        pass


def first_difference(recorded: list[dict[str, float]], replayed: list[dict[str, float]]) -> str | None:
    """The first computed number that differs between two epoch histories (as a phrase), or None."""
    for old, new in zip(recorded, replayed):
        for key in sorted(old.keys() | new.keys()):
            if key.endswith(MEASURED_SUFFIX):
                continue
            a, b = old.get(key), new.get(key)
            same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
            if not same:
                return f"epoch {old.get('epoch', '?')} {key}: recorded {a!r}, replayed {b!r}"
    return None


def _other_build(record: RunRecord, here: dict) -> str | None:
    """Why ``record`` cannot be replayed where ``here`` (this machine's provenance) was taken, or None."""
    recorded = [key for key in SAME_KERNELS if key in record.provenance]
    differ = [f"{key} {record.provenance.get(key)!r} here {here[key]!r}" for key in (*SAME_BUILD, *recorded)
              if record.provenance.get(key) != here[key]]
    differ += differing_blas(record.provenance.get("blas_kernels", ""), here["blas_kernels"])
    return "made on another build or machine: " + "; ".join(differ) if differ else None


def replay_run(store: ResultsStore, run_id: str, epochs: int | None = None, data_dir: Path | None = None) -> Replay:
    """Replays one finished run of ``store`` for its first ``epochs`` epochs (None: all of them) and, when every
    compared number is identical, records the replay in its provenance."""
    from kdbench.harness import RunEnv, run
    from kdbench.measure import provenance

    record = store.finished_record(run_id, repair=False)
    if record is None:
        return Replay(run_id, "skipped", detail="not a finished run")
    code = fingerprint(record.spec)
    if record.provenance.get("code_fingerprint") == code["code_fingerprint"]:
        return Replay(run_id, "current", detail="made by this code")
    if code["code_fingerprint"] in record.provenance.get("replays", {}):
        return Replay(run_id, "current", detail="replayed by this code before")
    if record.spec.pretrained:
        return Replay(run_id, "skipped", detail="an imported checkpoint: nothing was trained")
    if (record.spec.world_size or 1) > 1:
        return Replay(run_id, "skipped", detail=f"trained by {record.spec.world_size} processes; a replay runs in one")
    here = {**provenance(torch.device(record.spec.device)), **numeric_kernels()}  # the build, the commit, kernels
    other = _other_build(record, here)
    if other:
        return Replay(run_id, "skipped", detail=other)
    limit = len(record.epochs) if epochs is None else min(epochs, len(record.epochs))
    if limit < 1:
        return Replay(run_id, "skipped", detail="no epoch recorded")
    trainers = [t for t in (record.spec.teacher_run, *record.spec.assistant_runs) if t]
    missing = [t for t in trainers if not store.weights_path(t).is_file()]
    if missing:
        return Replay(run_id, "skipped", detail=f"the weights of {', '.join(missing)} that teach it are missing")
    capture = _Capture(limit)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kdbench-replay-") as scratch:
        scratch_store = ResultsStore(scratch)
        for trainer in trainers:  # their records copied, their weights linked: nothing here writes to the set
            folder = scratch_store.run_dir(trainer)
            folder.mkdir(parents=True)
            for name in ("spec.json", "record.json"):
                shutil.copy2(store.run_dir(trainer) / name, folder / name)
            (folder / "model.pt").symlink_to(store.weights_path(trainer).resolve())
        replayed = None
        try:
            torch.set_num_threads(int(record.provenance.get("cpu_threads") or threads))
            replayed = run(record.spec, RunEnv(scratch_store, data_dir=data_dir, download=False, progress=False,
                                               reuse_stale=True, sinks=(capture,)))
        except _EnoughEpochs:
            pass
        finally:
            torch.set_num_threads(threads)
    if len(capture.rows) < limit:  # the replay failed (or finished) before the epochs to compare
        why = replayed.error if replayed is not None and replayed.error else "no error recorded"
        return Replay(run_id, "differs", len(capture.rows), f"the replay ended after {len(capture.rows)} epochs: {why}")
    difference = first_difference(record.epochs[:limit], capture.rows)
    if difference:
        return Replay(run_id, "differs", limit, difference)
    _record_replay(store, record, code, here, limit)
    return Replay(run_id, "reproduced", limit, f"{limit} of {len(record.epochs)} epochs identical")


def _record_replay(store: ResultsStore, record: RunRecord, code: dict, here: dict, epochs: int) -> None:
    entry = {"code_core": code["code_core"], "code_files": code["code_files"], "git_sha": here["git_sha"],
             "git_dirty": here["git_dirty"], "epochs_compared": epochs, "epochs_recorded": len(record.epochs),
             "timestamp": here["timestamp"]}
    prov = dict(record.provenance)
    prov["replays"] = {**prov.get("replays", {}), code["code_fingerprint"]: entry}
    prov.update(replayed_code_fingerprint=code["code_fingerprint"], replayed_code_core=code["code_core"],
                replayed_git_sha=here["git_sha"], replayed_git_dirty=here["git_dirty"],
                replayed_epochs=f"{epochs}/{len(record.epochs)}")
    with store.claim(record.run_id):
        store.write_record(RunRecord(record.spec, record.status, record.metrics, record.epochs, prov, record.error))


def replay(store: ResultsStore, run_ids: list[str], epochs: int | None = None,
           data_dir: Path | None = None) -> list[Replay]:
    """Replays each run in turn, in the order given (each against its trainers' recorded weights, so no order is
    needed); the table is rebuilt once at the end."""
    if epochs is not None and epochs < 1:
        raise KdbenchError(f"--epochs must be at least 1, got {epochs}")
    outcomes = [replay_run(store, run_id, epochs, data_dir) for run_id in run_ids]
    if any(o.status == "reproduced" for o in outcomes):
        store.rebuild_table()
    return outcomes
