"""Costs priced in one sitting (``kdbench costs``): every finished run of a results directory priced again, one
setting after another, on one machine, so that methods compare at one machine's speed.

A run's own timings (``train_images_per_s``, ``wall_s``) are taken while it trains, on the machine and under the load
of that moment. A set made over several sessions mixes both: the CPU reference set's vgg13 teacher, made again bit
for bit on another machine of the same model, trained at 104 img/s against 201 img/s the first time, and seeds that
shared the CPU with other work recorded as little as a tenth of their siblings' speed. Throughput and end-to-end
columns averaged over such runs rank the machines, not the methods.

A sitting times each distinct setting with the dry run's measurement (``estimate``: the harness's own step,
evaluation and offline fit, untrained stand-ins for the trainers, a median step after a warm-up) and prices each
run from scratch by its recipe. It writes ``costs.parquet`` into the results directory: long format, a row per run
and metric (``sitting_train_images_per_s``, ``sitting_run_s``), each row with the sitting's machine, code and
number of steps, and the priced record's timestamp (a run made again later is not the run the sitting priced).
``kdbench report`` reads it with the runs (``report.load``); a table row shows the sitting's throughput and
end-to-end cost only where the sitting priced all its runs and the teachers and assistants they learned from, and
says so (``report.aggregate.shown_costs``). A later sitting replaces the file whole.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from kdbench.errors import KdbenchError
from kdbench.estimate import WARMUP_STEPS, _setting, estimate
from kdbench.harness import RunEnv
from kdbench.measure import provenance
from kdbench.results import DamagedRun, ResultsStore, atomic_write

COSTS_FILE = "costs.parquet"
METRICS = {"train_images_per_s": "sitting_train_images_per_s", "seconds": "sitting_run_s"}
COLUMNS = ("run_id", "metric", "value", "sitting", "sitting_id", "run_timestamp")  # what the report reads


def priceable(spec) -> bool:
    """Whether a sitting here can price the run: one process (the dry run's measurement times one; a run across
    processes keeps its own timings) on a device type this machine has."""
    return (spec.world_size or 1) == 1 and (spec.device != "cuda" or torch.cuda.is_available())


def sitting(store: ResultsStore, run_ids: list[str], steps: int = 20, eval_batches: int = 5,
            data_dir: Path | None = None, say: Callable[[str], None] = lambda line: None,
            ) -> tuple[pd.DataFrame, list[str]]:
    """The sitting's table for the finished runs among ``run_ids`` (``steps`` timed steps and ``eval_batches`` test
    batches per setting), and a line per run it left out and why. Each run is priced as if it were to train from
    scratch, its offline fit included (as the report charges a run that reused a cached fit). A setting that
    cannot be timed (out of memory, a method's error) leaves its runs out and the sitting goes on. Nothing is
    written under ``store``: the measurement works in a scratch store. ``say`` gets a line per setting timed (a
    sitting of a whole reference set takes tens of minutes)."""
    left_out, specs, stamps = [], [], {}
    for run_id in run_ids:
        try:
            record = store.load_record(run_id, repair=False)
        except DamagedRun as error:
            left_out.append(f"{run_id}: unreadable ({error})")
            continue
        if record is None or record.status != "finished":
            left_out.append(f"{run_id}: {record.status if record else 'no record'}, not finished")
        elif not priceable(record.spec):
            left_out.append(f"{run_id}: trained by {record.spec.world_size} processes or on a device absent here")
        else:
            specs.append(record.spec)
            stamps[run_id] = record.provenance.get("timestamp")
    if not specs:
        raise KdbenchError(f"none of the {len(run_ids)} runs chosen in {store.root} can be priced here: a sitting "
                           f"prices finished runs of one process on a device this machine has ({'; '.join(left_out)})")
    by_setting: dict[tuple, list] = {}
    for spec in specs:
        by_setting.setdefault(_setting(spec), []).append(spec)
    machines = {device: provenance(torch.device(device)) for device in {s.device for s in specs}}
    described = {device: _described(machine, steps) for device, machine in machines.items()}
    sitting_id, rows = uuid.uuid4().hex[:12], []
    with tempfile.TemporaryDirectory(prefix="kdbench-costs-") as scratch:  # every run priced as if to train
        env = RunEnv(ResultsStore(scratch), data_dir, download=False, progress=False)
        for number, group in enumerate(by_setting.values(), 1):
            first = group[0]
            setting = (f"setting {number}/{len(by_setting)}, {first.role} {first.method} {first.pair or first.student}"
                       f" ({len(group)} run{'s' * (len(group) != 1)})")
            try:
                priced = estimate(group, env, steps, eval_batches, shared_fits=False).runs
            except Exception as error:  # one setting's failure, as a sweep records a failed run and goes on
                why = " ".join(f"{type(error).__name__}: {error}".split())[:200]
                left_out += [f"{spec.run_id}: could not be timed ({why})" for spec in group]
                say(f"{setting}: could not be timed")
                continue
            say(f"{setting}: {priced[0].train_images_per_s:,.0f} img/s")
            for spec, run in zip(group, priced):
                machine = machines[spec.device]
                rows += [{"run_id": spec.run_id, "metric": metric, "value": float(getattr(run, field)),
                          "sitting": described[spec.device], "sitting_id": sitting_id, "steps": steps,
                          "run_timestamp": stamps[spec.run_id], **{k: machine[k] for k in (
                              "device_name", "cpu_threads", "torch_version", "git_sha", "git_dirty", "timestamp")}}
                         for field, metric in METRICS.items()]
    if not rows:
        raise KdbenchError(f"no setting could be timed in {store.root}: {'; '.join(left_out)}")
    return pd.DataFrame(rows), left_out


def _described(machine: dict, steps: int) -> str:
    threads = machine["cpu_threads"]
    return (f"{machine['timestamp'][:10]} on {machine['device_name']} with {threads} thread{'s' * (threads != 1)}, "
            f"{steps} steps per setting after {WARMUP_STEPS} warm-up, kdbench {str(machine['git_sha'])[:7]}"
            + (" with uncommitted changes" if machine["git_dirty"] else ""))


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
        frame = pd.read_parquet(path)
    except Exception as error:  # a truncated or foreign file
        raise KdbenchError(f"cannot read {path}: {' '.join(str(error).split())}; `kdbench costs --results-dir "
                           f"{root}` measures it again") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise KdbenchError(f"{path} lacks column(s) {', '.join(missing)}: not a table `kdbench costs` wrote; "
                           f"`kdbench costs --results-dir {root}` measures it again")
    return frame
