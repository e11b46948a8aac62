"""``make gpu-check``: every check that needs a CUDA GPU, in one call of at most 8 minutes on one H100 or H200.

Stages, most valuable first, each under its own time limit (``LIMITS``: 465 s in all, so a stage that hangs costs
its share and no more):

1. ``tests``: the GPU-marked tests (CUDA graphs against eager for kd, fitnet, semckd and rkd among them).
2. ``methods``: every registered method on vgg13 -> vgg8, one epoch of ``SUBSET`` images of a fake CIFAR-100 with a
   random vgg13 teacher: steady-state img/s and peak memory, or the reason it failed.
3. ``official``: kd and semckd on vgg13 -> vgg8 beside RepDistiller's and SemCKD's own ``train_student.py``, one
   epoch of the same fake images each (benchmarks/official/run_official.py runs theirs unmodified).
4. ``packing``: kd resnet56 -> resnet20, K = 1, 2, 4, 8 runs at once on the one GPU: the sweep's throughput (train
   images over the makespan, and the runs' steady img/s summed) and its gain over K = 1 (from the steady rates:
   the makespan also counts start-up). Through ``--runs-per-gpu`` where Ray is installed, else as K plain
   ``kdbench run`` processes, as Ray would start them: the gain is the GPU's either way.
5. ``graphs``: kd and semckd compiled with CUDA graphs (``--compile reduce-overhead``), against stage 2's eager runs
   (the GPU tests of stage 1 compare graphed and eager steps of kd, fitnet, semckd, rkd and mlkd).
6. ``profile``: ``kdbench run --profile`` of a few methods: step rate, phases, and the fraction of the device's peak.

``--stages trace``, a call of its own (up to 4 minutes): stage 3's SemCKD loops, kdbench's and SemCKD's own, under
torch.profiler, for where kdbench's step loses to the official one.

``--stages ddp``, a call of its own (up to 5 minutes) on a machine of two GPUs or more: one run across all of them
(issue 27's scaling figure and the per-step all-reduce).

Writes ``gpu-check.csv`` (one tidy table: stage, name, setting, metric, value) and ``summary.md`` (to paste into an
issue) under ``--out``. ``--cpu`` runs the same commands on this machine's CPU at toy sizes: the dry run that proves
the plumbing before a GPU is lent; its numbers mean nothing.

On a device machine without kdbench's dependencies, carry their wheels (docs/performance.md#gpu-check). The official
repositories are cloned beside benchmarks/official (its README); without them stage 3 says so and is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OFFICIAL = HERE / "official"
LIMITS = {"setup": 15, "tests": 90, "methods": 120, "official": 80, "packing": 80, "graphs": 40, "profile": 40,
          "trace": 240, "ddp": 300}
OPTIONAL = ("trace", "ddp")  # stages run only when named (--stages): beyond the 8 minutes
PROFILED = "kd,fitnet,semckd,crd,dkd,reviewkd"  # stage 6: a logit, two feature, a contrastive and a relation method
PACKING = (1, 2, 4, 8)
CPU_SLOWER = 4  # the CPU dry run's limits, times the GPU's: the same commands, slower


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/kdbench-gpu-check"), help="data and runs")
    parser.add_argument("--cpu", action="store_true", help="the dry run: this machine's CPU, toy sizes")
    parser.add_argument("--stages", default=",".join(s for s in LIMITS if s not in ("setup", *OPTIONAL)))
    parser.add_argument("--methods", help="stage 2's methods (default: every registered one)")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in LIMITS or s == "setup"]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; valid stages: {', '.join(s for s in LIMITS if s != 'setup')}")
    check = Check(args)
    for stage in stages:
        check.stage(stage)
    return check.finish()


class Check:
    """One run of the checks: the sizes, the commands, and the rows of the tidy table."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.rows, self.notes, self.started = args, [], [], time.monotonic()
        self.skipped: list[str] = []  # what could not run here (no official code): said, not a failure
        self.device = "cpu" if args.cpu else "cuda"
        # train images per run: stage 2 and 5's; stage 3's dataset (both loops train on all of it); stage 4's. The
        # paper recipe times steps after its first 50: on the CPU, batches of 16 keep that many steps cheap.
        self.subset, self.official_n, self.packing_n = (960, 960, 960) if args.cpu else (6400, 12800, 25600)
        self.batch = ["--batch-size", "16"] if args.cpu else []
        args.out.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        self.data = args.work / "data"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get(
            "PYTHONPATH")])), "PYTHONUNBUFFERED": "1"}
        self._setup()

    # ------------------------------------------------------------------------------------------------ plumbing

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:5.0f} s] {text}"
        print(line, flush=True)
        with (self.args.out / "log.txt").open("a") as log:
            log.write(line + "\n")

    def call(self, stage: str, command: list[str], limit: float, log: str) -> tuple[int, float]:
        """Runs ``command`` (output to ``log`` under --out) within ``limit`` seconds: (exit status, seconds);
        124 when it ran out of time."""
        started = time.monotonic()
        with (self.args.out / log).open("a") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            try:
                status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                        timeout=max(1.0, limit)).returncode
            except subprocess.TimeoutExpired:
                status = 124
        seconds = time.monotonic() - started
        if status:
            self.notes.append(f"{stage}: `{' '.join(command[2:5])} ...` exited {status} after {seconds:.0f} s "
                              f"(see {log})")
        return status, seconds

    def row(self, stage: str, name: str, setting: str, metric: str, value) -> None:
        self.rows.append({"stage": stage, "name": name, "setting": setting, "metric": metric, "value": value})

    def kdbench(self, *args: str) -> list[str]:
        """A `kdbench run` on the fake CIFAR-100 (its md5 check off: benchmarks/official/kdbench_fake.py)."""
        return [sys.executable, str(OFFICIAL / "kdbench_fake.py"), "run", "--dataset", "cifar100", "--data-dir",
                str(self.data / "main" / "kdbench"), "--no-download", "--device", self.device, "--recipe", "paper",
                "--epochs", "1", "--test-subset", "1000", *self.batch, *args]

    def teacher(self, arch: str) -> str:
        return str(self.data / "main" / "teachers" / f"{arch}_cifar100_lr_0.05_decay_0.0005_trial_0"
                   / f"{arch}_best.pth")

    @staticmethod
    def semckd_beta(methods: str) -> list[str]:
        """SemCKD at beta = 50: with random teachers the default 400 diverges within an epoch (the work is the
        same)."""
        return ["--set", "semckd.beta=50"] if "semckd" in methods.split(",") else []

    def records(self, results: Path) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(results.glob("*/record.json"))]

    def run_rows(self, stage: str, results: Path, setting: str) -> list[dict]:
        """Each student run's cost under ``results`` as rows; its record back."""
        students = [r for r in self.records(results) if r["spec"]["role"] == "student"]
        for r in students:
            name, m = r["spec"]["method"], r.get("metrics", {})
            self.row(stage, name, setting, "status", r["status"] if not r.get("error") else f"failed: {r['error']}")
            for metric in ("train_images_per_s", "step_ms_median", "peak_alloc_bytes", "peak_reserved_bytes",
                           "cpu_peak_rss_bytes", "wall_s", "train_images"):
                if m.get(metric) is not None:
                    self.row(stage, name, setting, metric, m[metric])
        return students

    # ---------------------------------------------------------------------------------------------------- stages

    def _setup(self) -> None:
        """The fake CIFAR-100s and random teachers, once per --work folder."""
        self.say(f"setup: {self.device}, work {self.args.work}, out {self.args.out}")
        if not self.args.cpu:
            subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv"], check=False)
        for name, n in (("main", 50000 if not self.args.cpu else 2000), ("official", self.official_n)):
            if not (self.data / name / "kdbench").is_dir():
                self.call("setup", [sys.executable, str(OFFICIAL / "fake_cifar100.py"), str(self.data / name),
                                    str(n), "1000"], LIMITS["setup"] * (CPU_SLOWER if self.args.cpu else 0.5),
                          "setup.log")

    def stage(self, name: str) -> None:
        """Runs one stage; an error in it is a note, and the later stages still run."""
        limit = LIMITS[name] * (CPU_SLOWER if self.args.cpu else 1)
        self.say(f"{name} (limit {limit} s)")
        try:
            getattr(self, f"_{name}")(limit)
        except Exception as error:  # noqa: BLE001 -- the table and summary are written whatever a stage did
            self.notes.append(f"{name}: stopped by {type(error).__name__}: {error}")

    def _tests(self, limit: float) -> None:
        files = [f"tests/{f}" for f in ("test_gpu.py", "test_compile.py", "test_imagefolder.py", "test_benchmarks.py")]
        status, seconds = self.call("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q",
                                              "-p", "no:cacheprovider", *files], limit, "tests.log")
        tail = (self.args.out / "tests.log").read_text().strip().splitlines()[-1:]
        self.row("tests", "pytest -m gpu", "", "summary", tail[0] if tail else f"exit {status}")
        self.row("tests", "pytest -m gpu", "", "exit_status", status)

    def _methods(self, limit: float) -> None:
        from kdbench.methods import list_methods

        methods = self.args.methods or ",".join(list_methods())
        results = self.args.work / "methods"
        self.call("methods", self.kdbench(
            "--methods", methods, "--pairs", "vgg13:vgg8", "--train-subset", str(self.subset),
            "--teacher-ckpt", self.teacher("vgg13"), "--teacher-epochs", "1", "--teacher-train-subset",
            str(self.subset), *self.semckd_beta(methods), "--results-dir", str(results)), limit, "methods.log")
        done = {r["spec"]["method"] for r in self.run_rows("methods", results, "fp32 eager")}
        for method in sorted(set(methods.split(",")) - done):
            self.row("methods", method, "fp32 eager", "status", "not run: out of time or refused on this pair")

    def _loops(self, method: str) -> tuple[str, list[str], list[str]] | None:
        """(official repository, kdbench command, official command) training ``method`` (kd or semckd) on vgg13 ->
        vgg8 for one epoch of the same fake images and teacher; None without the repository."""
        repo, weights = {"kd": ("RepDistiller", ["-r", "0.1", "-a", "0.9", "-b", "0"]),
                         "semckd": ("SemCKD", ["-r", "1", "-a", "1", "-b", "50"])}[method]
        if not (OFFICIAL / "repos" / repo).is_dir():
            self.skipped.append(f"no benchmarks/official/repos/{repo} (see benchmarks/official/README.md)")
            return None
        data = self.data / "official"
        teacher = str(data / "teachers" / "vgg13_cifar100_lr_0.05_decay_0.0005_trial_0" / "vgg13_best.pth")
        ours = self.kdbench("--methods", method, "--pairs", "vgg13:vgg8", "--teacher-ckpt", teacher,
                            *self.semckd_beta(method), "--results-dir", str(self.args.work / "official" / method))
        ours[ours.index("--data-dir") + 1] = str(data / "kdbench")
        theirs = [sys.executable, str(OFFICIAL / "run_official.py"), str(OFFICIAL / "repos" / repo),
                  str(data / "torchvision"), "train_student.py", "--model_s", "vgg8", "--trial", "0", "--epochs",
                  "1", "--distill", method, *weights, "--path-t" if repo == "SemCKD" else "--path_t", teacher]
        return repo, ours, theirs

    def _official(self, limit: float) -> None:
        for method in ("kd", "semckd"):
            loops = self._loops(method)
            if loops is None:
                continue
            repo, ours, theirs = loops
            self.call("official", ours, limit / 4, "official.log")
            for r in self.run_rows("official", Path(ours[ours.index("--results-dir") + 1]), "kdbench"):
                epoch = min((e["epoch_s"] for e in r["epochs"]), default=None)
                if epoch:
                    self.row("official", method, "kdbench", "epoch_images_per_s", self.official_n / epoch)
            log = f"official-{repo}.log"
            self.call("official", theirs, limit / 4, log)
            for line in (self.args.out / log).read_text().splitlines():
                if line.startswith("epoch 1, total time"):
                    self.row("official", method, repo, "epoch_images_per_s", self.official_n / float(line.split()[-1]))

    def _trace(self, limit: float) -> None:
        """Not in the 8 minutes: both SemCKD loops under torch.profiler (benchmarks/official/traced.py), for where
        kdbench's step loses to SemCKD's own; the tables and traces land under --out."""
        loops = self._loops("semckd")
        if loops is None:
            return
        repo, ours, theirs = loops
        ours[ours.index("--results-dir") + 1] += "-traced"
        for name, command in (("kdbench", ours), (repo, theirs)):
            out = str(self.args.out / f"trace-semckd-{name}")
            self.call("trace", [sys.executable, str(OFFICIAL / "traced.py"), out, *command[1:]], limit / 2,
                      f"trace-{name}.log")
            self.row("trace", "semckd", name, "profile", f"{Path(out).name}.txt")

    def _ddp(self, limit: float) -> None:
        """Not in the 8 minutes, and only with two GPUs or more (two gloo processes in the dry run): kd tv_resnet34
        -> tv_resnet18 at the ImageNet recipe's global batch of 256, on one process and then on every GPU under
        torchrun, on the fake CIFAR-100: 32 px images, so each step's all-reduce is ImageNet's and its compute about a
        49th of it, and the scaling a lower bound of ImageNet's. Then the all-reduce of ResNet-18's gradients alone
        (benchmarks/allreduce.py)."""
        import torch

        from kdbench.models import create_model

        n = 2 if self.args.cpu else torch.cuda.device_count()
        if n < 2:
            self.skipped.append(f"ddp: a run across processes needs two GPUs or more; this machine has {n}")
            return
        teacher = self.args.work / "tv_resnet34-random.pt"
        if not teacher.is_file():
            torch.save(create_model("tv_resnet34", 100, 3).state_dict(), teacher)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
        rates = {}
        for processes in (1, n):
            results = self.args.work / "ddp" / f"n{processes}"
            command = self.kdbench("--methods", "kd", "--pairs", "tv_resnet34:tv_resnet18", "--train-subset",
                                   str(self.packing_n), "--teacher-ckpt", str(teacher), "--results-dir", str(results),
                                   *([] if self.args.cpu else ["--batch-size", "256"]))
            self.call("ddp", command if processes == 1 else torchrun + command[1:], limit * 0.4, "ddp.log")
            setting = f"{processes} process{'es' if processes > 1 else ''}"
            finished = [r for r in self.run_rows("ddp", results, setting) if r["status"] == "finished"]
            rates[processes] = finished[0]["metrics"]["train_images_per_s"] if finished else None
        if rates[1] and rates[n]:
            self.row("ddp", "kd", f"{n} processes", "scaling_efficiency_percent", 100 * rates[n] / (n * rates[1]))
        with (self.args.out / "ddp.log").open("a") as out:
            done = subprocess.run(torchrun + [str(HERE / "allreduce.py"), "tv_resnet18"], stdout=subprocess.PIPE,
                                  stderr=out, text=True, env=self.env, cwd=ROOT, timeout=limit * 0.2)
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                measured = json.loads(line)
                for metric in ("allreduce_ms", "bus_gb_per_s", "megabytes"):
                    self.row("ddp", "all-reduce tv_resnet18", f"{n} processes {measured['backend']}", metric,
                             measured[metric])

    def _packing(self, limit: float) -> None:
        try:
            import ray  # noqa: F401
            through = "--runs-per-gpu"
        except ImportError:
            through = "processes"
        if self.args.cpu:
            through = "processes"  # --runs-per-gpu refuses CPU runs: the dry run proves the processes' plumbing
        base = self.kdbench("--methods", "kd", "--pairs", "resnet56:resnet20", "--train-subset",
                            str(self.packing_n), "--teacher-ckpt", self.teacher("resnet56"))
        rates, counts = {}, PACKING[:2] if self.args.cpu else PACKING  # two cores: K = 1, 2
        for k in counts:
            results = self.args.work / "packing" / f"k{k}"
            setting = f"K={k} ({through})"
            started = time.monotonic()
            seeds = [str(s) for s in range(k)]
            if through == "--runs-per-gpu":
                self.call("packing", base + ["--seeds", ",".join(seeds), "--runs-per-gpu", str(k),
                                             "--results-dir", str(results)], limit / len(counts), "packing.log")
            else:
                with (self.args.out / "packing.log").open("a") as out:
                    group = [subprocess.Popen(base + ["--seeds", s, "--results-dir", str(results)], stdout=out,
                                              stderr=subprocess.STDOUT, env=self.env, cwd=ROOT) for s in seeds]
                    for process in group:
                        try:
                            process.wait(timeout=max(1.0, limit / len(counts) - (time.monotonic() - started)))
                        except subprocess.TimeoutExpired:
                            process.kill()
                    if any(process.returncode for process in group):
                        self.notes.append(f"packing: K={k}: {sum(p.returncode != 0 for p in group)} of {k} runs "
                                          f"failed or ran out of time (see packing.log)")
            makespan = time.monotonic() - started
            students = [r for r in self.run_rows("packing", results, setting) if r["status"] == "finished"]
            images = sum(r["metrics"]["train_images"] for r in students)
            steady = sum(r["metrics"].get("train_images_per_s", float("nan")) for r in students)
            self.row("packing", "kd", setting, "runs_finished", len(students))
            self.row("packing", "kd", setting, "sweep_images_per_s_makespan", images / makespan)
            self.row("packing", "kd", setting, "sweep_images_per_s_steady_sum", steady)
            rates[k] = steady if len(students) == k else None
        if rates.get(1):
            for k, rate in rates.items():
                if rate:
                    self.row("packing", "kd", f"K={k} ({through})", "gain_over_k1_steady", rate / rates[1])

    def _graphs(self, limit: float) -> None:
        results = self.args.work / "graphs"
        self.call("graphs", self.kdbench(
            "--methods", "kd,semckd", "--pairs", "vgg13:vgg8", "--train-subset", str(self.subset), "--teacher-ckpt",
            self.teacher("vgg13"), *self.semckd_beta("semckd"), "--compile", "reduce-overhead", "--results-dir",
            str(results)), limit, "graphs.log")
        self.run_rows("graphs", results, "fp32 reduce-overhead")

    def _profile(self, limit: float) -> None:
        results = self.args.work / "profile"
        self.call("profile", self.kdbench("--methods", PROFILED, "--pairs", "vgg13:vgg8", "--teacher-ckpt",
                                          self.teacher("vgg13"), "--profile", "--results-dir", str(results)),
                  limit, "profile.log")
        if (results / "profile.csv").is_file():
            import pandas as pd

            table = pd.read_csv(results / "profile.csv")
            for r in table[table.metric.isin(["img_per_s_harness", "img_per_s_bare", "fraction_of_peak"])].itertuples():
                percent = r.metric == "fraction_of_peak"
                self.row("profile", r.method, f"{r.precision} {r.compile}", "percent_of_peak" if percent else r.metric,
                         100 * r.value if percent else r.value)

    # --------------------------------------------------------------------------------------------------- output

    def finish(self) -> int:
        import pandas as pd
        from tabulate import tabulate

        table = pd.DataFrame(self.rows, columns=["stage", "name", "setting", "metric", "value"])
        table.insert(0, "device", self.device)
        table.to_csv(self.args.out / "gpu-check.csv", index=False)
        total = time.monotonic() - self.started
        lines = [f"# make gpu-check, {datetime.now():%Y-%m-%d %H:%M}, {self.device}"
                 + (" (the CPU dry run: toy sizes, numbers mean nothing)" if self.args.cpu else ""),
                 "", f"{total:.0f} s in all (stages {self.args.stages}). Tidy table: gpu-check.csv.", ""]
        shown = {"train_images_per_s": "img/s", "peak_reserved_bytes": "peak reserved MiB",
                 "epoch_images_per_s": "epoch img/s", "sweep_images_per_s_makespan": "sweep img/s (makespan)",
                 "sweep_images_per_s_steady_sum": "sweep img/s (steady, summed)", "gain_over_k1_steady": "gain",
                 "runs_finished": "runs", "status": "status", "summary": "summary",
                 "img_per_s_harness": "img/s (harness)", "img_per_s_bare": "img/s (bare loop)",
                 "percent_of_peak": "% of peak", "profile": "operators and trace",
                 "scaling_efficiency_percent": "scaling %", "allreduce_ms": "all-reduce ms",
                 "bus_gb_per_s": "bus GB/s"}
        for stage, rows in table.groupby("stage", sort=False):
            rows = rows[rows.metric.isin(shown)]
            wide = rows.pivot_table(index=["name", "setting"], columns="metric", values="value", aggfunc="first",
                                    sort=False)
            if "peak_reserved_bytes" in wide:
                wide["peak_reserved_bytes"] = pd.to_numeric(wide["peak_reserved_bytes"]) / 2**20
            wide = wide.rename(columns=shown)
            lines += [f"## {stage}", "", tabulate(wide.reset_index(), headers="keys", tablefmt="github",
                                                   showindex=False, floatfmt=",.1f"), ""]
        if self.notes or self.skipped:
            lines += ["## Notes", "", *(f"- {note}" for note in self.notes + self.skipped), ""]
        (self.args.out / "summary.md").write_text("\n".join(lines))
        print("\n".join(lines))
        return 1 if self.notes and not self.args.cpu else 0


if __name__ == "__main__":
    sys.exit(main())
