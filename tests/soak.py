"""Kill -9 soak (``make soak``): kill a sweep at random moments, let it finish, check that nothing was lost.

A small sweep (teacher + student and kd, two seeds, synthetic data) is run once without interruption, then again
in another results dir where it is killed with SIGKILL (its whole process group: for the ray executor, the driver
and the local cluster it started) at random moments, ``--kills`` times in all, before it may finish (a sweep that
finishes between two kills is checked too, and the next kill goes to a new one). Then every
run must be finished once, every file must parse, no temporary file or held lock may be left, and accuracies and
weights must equal the uninterrupted sweep. Every third kill waits for a file write to be in flight (checkpoint,
weights, record, table). Prints where the kills hit (from the run's last log line, and the files being written)
and exits non-zero on any failure.

    python tests/soak.py --executor local --kills 15
    python tests/soak.py --executor ray --kills 15
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock, Timeout

SWEEP = ["run", "--methods", "student,kd", "--pairs", "resnet14:resnet8", "--dataset", "synthetic",
         "--recipe", "short", "--epochs", "3", "--batch-size", "32", "--teacher-epochs", "3", "--seeds", "0,1",
         "--device", "cpu"]


def kdbench(results: Path, executor: str, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "kdbench.cli", *SWEEP, "--results-dir", str(results),
                                 "--executor", executor], stdout=out, stderr=out, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def where(results: Path, log: Path) -> str:
    """What the sweep was doing when it was killed: from its last progress line, and any write in flight."""
    lines = [line.split("kdbench: ", 1)[1] for line in log.read_text().splitlines() if "kdbench: " in line]
    last = lines[-1] if lines else ""
    role = next((w.split("-")[0] for w in last.split() if w.count("-") >= 3), "")
    if " epoch " in f" {last} ":
        doing = f"{role} training"
    elif "starts" in last or "resumes" in last:
        doing = f"{role} starting"
    elif last:
        doing = "between runs"
    else:
        doing = "starting up"
    writing = _writing(results)
    return doing + (f" [writing {', '.join(writing)}]" if writing else "")


def _writing(results: Path) -> list[str]:
    """The files being written now (their temporary files exist)."""
    return sorted({p.name.split(".")[1] for p in results.rglob(".*.tmp")}) if results.is_dir() else []


def soak(executor: str, kills: int, work: Path) -> list[str]:
    reference = work / "reference"
    subprocess.run([sys.executable, "-m", "kdbench.cli", *SWEEP, "--results-dir", str(reference)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    started = time.monotonic()
    kdbench(work / "timing", executor, work / "timing.log").wait()
    duration = time.monotonic() - started
    hits: list[str] = []
    rounds = [work / "soaked-1"]  # a round that finishes between kills is checked, and the next one starts afresh
    rng = random.Random(0)
    while len(hits) < kills:
        log = rounds[-1].with_suffix(".log")
        process = kdbench(rounds[-1], executor, log)
        if len(hits) % 3 == 2:  # every third kill lands while a file is being written
            deadline = time.monotonic() + duration
            while process.poll() is None and time.monotonic() < deadline and not _writing(rounds[-1]):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.2, duration / 2))
        if process.poll() is not None:
            if process.returncode != 0:
                return [f"a sweep failed after a kill: see {log}"]
            rounds.append(work / f"soaked-{len(rounds) + 1}")
            continue
        hits.append(where(rounds[-1], log))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if kdbench(rounds[-1], executor, rounds[-1].with_suffix(".log")).wait() != 0:
        return [f"the last, uninterrupted sweep failed: see {rounds[-1].with_suffix('.log')}"]
    print(f"{executor}: {len(hits)} kills over {len(rounds)} sweep(s) of {duration:.0f} s; where they hit:")
    for place, count in collections.Counter(hits).most_common():
        print(f"  {count:3d} × {place}")
    return [problem for soaked in rounds for problem in check(reference, soaked)]


def check(reference: Path, soaked: Path) -> list[str]:
    problems = []
    runs = sorted(p.parent.name for p in reference.glob("*/record.json"))
    for run_id in runs:
        mine = json.loads((soaked / run_id / "record.json").read_text())
        theirs = json.loads((reference / run_id / "record.json").read_text())
        if mine["status"] != "finished" or len(mine["epochs"]) != len(theirs["epochs"]):
            problems.append(f"{run_id}: {mine['status']} with {len(mine['epochs'])} epochs")
        if [e["top1"] for e in mine["epochs"]] != [e["top1"] for e in theirs["epochs"]]:
            problems.append(f"{run_id}: accuracies differ from the uninterrupted sweep")
        a, b = (torch.load(root / run_id / "model.pt", weights_only=True) for root in (soaked, reference))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            problems.append(f"{run_id}: weights differ from the uninterrupted sweep")
    extra = sorted(set(p.parent.name for p in soaked.glob("*/record.json")) - set(runs))
    problems += [f"{run_id}: a run the plan does not have" for run_id in extra]
    table = pd.read_parquet(soaked / "metrics.parquet")
    if table.groupby(["run_id", "metric", "epoch"], dropna=False).size().max() != 1 or set(table.run_id) != set(runs):
        problems.append("the all-runs table does not hold every run exactly once")
    for path in soaked.rglob("*"):
        if path.name.endswith(".tmp"):
            problems.append(f"temporary file left: {path}")
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".lock":
            try:
                FileLock(path).acquire(timeout=0)
            except Timeout:
                problems.append(f"lock still held: {path}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", default="local", choices=("local", "ray"))
    parser.add_argument("--kills", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdbench-soak-") as work:
        problems = soak(args.executor, args.kills, Path(work))
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"{args.executor}: {'no failures' if not problems else f'{len(problems)} failure(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
