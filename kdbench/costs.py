"""Costs priced in one sitting (``kdbench costs``): every finished run of a results directory priced again, one
setting after another, on one machine, so that methods compare at one machine's speed.

A run's own timings (``train_images_per_s``, ``wall_s``) are taken while it trains, on the machine and under the load
of that moment. A set made over several sessions mixes both: the CPU reference set's vgg13 teacher, made again bit
for bit on another machine of the same model, trained at 104 img/s against 201 img/s the first time, and runs that
shared the CPU with other work recorded a fifth of their seeds' speed. Throughput and end-to-end columns averaged
over such runs rank the machines, not the methods.

A sitting times each distinct setting with the dry run's measurement (``estimate``: the harness's own step,
evaluation and offline fit, untrained stand-ins for the trainers, a median step after a warm-up) and prices each
run from scratch by its recipe. It writes ``costs.parquet`` into the results directory: long format, a row per run
and metric (``sitting_train_images_per_s``, ``sitting_run_s``), each row with the sitting's machine, code and
number of steps. ``kdbench report`` reads it with the runs (``report.load``) and takes throughput and end-to-end
cost from it where it covers a run, saying so under the table; a later sitting replaces it whole.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pandas as pd
import torch

from kdbench.errors import KdbenchError
from kdbench.estimate import WARMUP_STEPS, estimate
from kdbench.harness import RunEnv
from kdbench.measure import provenance
from kdbench.results import ResultsStore, atomic_write

COSTS_FILE = "costs.parquet"
METRICS = {"train_images_per_s": "sitting_train_images_per_s", "seconds": "sitting_run_s"}


def sitting(store: ResultsStore, run_ids: list[str], steps: int = 20, eval_batches: int = 5,
            data_dir: Path | None = None) -> pd.DataFrame:
    """The sitting's table for the finished runs among ``run_ids``: ``steps`` timed steps and ``eval_batches`` test
    batches per setting. Nothing is written under ``store`` (the dry run's measurement works in a scratch store)."""
    records = [r for r in map(store.load_record, run_ids) if r is not None and r.status == "finished"]
    specs = [r.spec for r in records if priceable(r.spec)]
    if not specs:
        raise KdbenchError(f"none of the {len(run_ids)} runs chosen in {store.root} can be priced here: a sitting "
                           f"prices finished runs of one process on a device this machine has "
                           f"({len(records)} finished)")
    with tempfile.TemporaryDirectory(prefix="kdbench-costs-") as scratch:  # every run priced as if to train
        priced = estimate(specs, RunEnv(ResultsStore(scratch), data_dir, download=False, progress=False), steps,
                          eval_batches)
    machines = {device: provenance(torch.device(device)) for device in {s.device for s in specs}}
    rows = []
    for spec, run in zip(specs, priced.runs):
        machine = machines[spec.device]
        threads = machine["cpu_threads"]
        described = (f"{machine['timestamp'][:10]}, {machine['device_name']}, {threads} thread{'s' * (threads != 1)}, "
                     f"{steps} steps per setting after {WARMUP_STEPS} warm-up, kdbench {str(machine['git_sha'])[:7]}"
                     + (" (uncommitted changes)" if machine["git_dirty"] else ""))
        for field, metric in METRICS.items():
            rows.append({"run_id": spec.run_id, "metric": metric, "value": float(getattr(run, field)),
                         "sitting": described, "steps": steps, **{k: machine[k] for k in (
                             "device_name", "cpu_threads", "torch_version", "git_sha", "git_dirty", "timestamp")}})
    frame = pd.DataFrame(rows)
    frame["sitting_id"] = uuid.uuid4().hex[:12]
    return frame


def priceable(spec) -> bool:
    """Whether a sitting here can price the run: one process (the dry run's measurement times one; a run across
    processes keeps its own timings) on a device type this machine has."""
    return (spec.world_size or 1) == 1 and (spec.device != "cuda" or torch.cuda.is_available())


def write(root: Path, frame: pd.DataFrame) -> Path:
    path = root / COSTS_FILE
    atomic_write(path, lambda p: frame.to_parquet(p, index=False))
    return path


def read(root: Path) -> pd.DataFrame | None:
    """The results directory's sitting (None: none yet); one clear KdbenchError for a file that cannot be read."""
    path = root / COSTS_FILE
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as error:  # a truncated or foreign file
        raise KdbenchError(f"cannot read {path}: {' '.join(str(error).split())}; `kdbench costs --results-dir "
                           f"{root}` measures it again") from None
