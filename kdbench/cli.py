"""``kdbench`` command line: parse arguments into a sweep spec, hand it to the harness, print results.

User mistakes end with one line on stderr and exit status 2; nothing is written before validation.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdbench.errors import KdbenchError
from kdbench.report import CORRECTIONS, FORMATS, LAYOUTS, METRICS
from kdbench.spec import DATA_BACKENDS, PROTOCOLS, SweepSpec

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from kdbench.spec import RunSpec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise KdbenchError(f"{message} (see `{self.prog} --help`)")


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise KdbenchError(f"malformed {what} {text!r}; write comma-separated integers, e.g. 0,1,2") from None
    return values


def _option(text: str) -> tuple[str, str, str]:
    target, sep, value = text.partition("=")
    method, dot, key = target.partition(".")
    if not (sep and dot and method and key):
        raise KdbenchError(f"malformed --set {text!r}; write METHOD.KEY=VALUE, e.g. fitnet.hint_layer=1")
    return method, key, value


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def _writable_dir(path: Path, flag: str) -> None:
    """Fails unless ``path`` is a folder kdbench can write in or create; checked before anything is written, so a
    bad path is a one-line error, not a traceback after hours of training."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise KdbenchError(f"{flag}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KdbenchError(f"{flag}: no permission to write in {existing}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdbench")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdbench", description="Benchmark knowledge-distillation methods.")
    parser.add_argument("--version", action="version", version=f"kdbench {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     help="run: train and record; report: tables and plots; list: what there is")

    # Flags left out are absent from the namespace (SUPPRESS): a sweep file's value, else the schema's default
    # (kdbench.config.SweepFile), applies to them; a flag given overrides both.
    run = commands.add_parser("run", help="train teachers and students, write tidy results",
                              argument_default=argparse.SUPPRESS)
    run.add_argument("--config", type=Path, metavar="FILE.yaml",
                     help="a sweep file holding any of these flags as keys (see configs/); flags given override it")
    run.add_argument("--methods", help="comma-separated method names (see `kdbench list methods`)")
    run.add_argument("--pairs", help="comma-separated TEACHER:STUDENT pairs, e.g. vgg13:vgg8")
    run.add_argument("--dataset", help="the dataset (default cifar100; see `kdbench list datasets`)")
    run.add_argument("--seeds", help="comma-separated student seeds (default 0)")
    run.add_argument("--recipe",
                     help="students' recipe: paper (RepDistiller, 240 epochs; the default), letkd-native, cpu (the "
                          "CPU benchmark) or short (a CPU smoke run); see `kdbench list recipes`")
    run.add_argument("--epochs", type=int,
                     help="override the recipe's epochs (lr milestones and options counted in epochs scale along)")
    run.add_argument("--batch-size", type=int, help="override the recipe's training batch size")
    run.add_argument("--train-subset", type=int, help="train on a fixed subset of this many images")
    run.add_argument("--test-subset", type=int, help="evaluate on a fixed subset of this many test images")
    run.add_argument("--image-size", type=int,
                     help="input side for imagenet and tiny-imagenet (default 224 and 64; teachers too): smaller "
                          "crops for quick checks, recorded in the run's recipe")
    run.add_argument("--lr", type=float, help="override the base learning rate")
    run.add_argument("--teacher-recipe", help="teachers' recipe (default: the one the students' recipe names)")
    run.add_argument("--teacher-epochs", type=int, help="override the teacher recipe's epochs")
    run.add_argument("--teacher-train-subset", type=int, help="train teachers on a fixed subset of this many images")
    run.add_argument("--teacher-lr", type=float, help="override the teacher recipe's base learning rate")
    run.add_argument("--set", action="append", metavar="METHOD.KEY=VALUE[,VALUE...]", dest="options",
                     help="a method option, e.g. fitnet.hint_layer=1; several values are a grid, one run per value "
                          "(repeatable, once per option; see `kdbench list methods NAME`)")
    run.add_argument("--ta-chain", action="append", metavar="TEACHER:TA1:...:STUDENT", dest="ta_chains",
                     help="teacher-assistant chain for takd/dgkd (repeatable, one per pair); default per pair")
    run.add_argument("--protocol",
                     help=f"loss-weight preset: {', '.join(PROTOCOLS)} (default {PROTOCOLS[0]}: each method as its "
                          "official code runs it)")
    run.add_argument("--device", help="auto (CUDA when present; the default), cuda or cpu")
    run.add_argument("--amp", action="store_const", const="bf16", dest="precision",
                     help="bf16 autocast around the forwards (parameters stay fp32)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    run.add_argument("--gpus-per-run", type=int, metavar="N",
                     help="train each run with N processes (DDP: one per GPU, NCCL; on CPUs, gloo), started by "
                          "torch's elastic launcher; under torchrun, the world size it sets (docs/scale-out.md)")
    run.add_argument("--sync-bn", action="store_true",
                     help="with several processes per run, BatchNorm statistics over the global batch, not per "
                          "process")
    run.add_argument("--data-backend", choices=DATA_BACKENDS,
                     help="how imagenet and tiny-imagenet JPEGs are decoded: cpu (the default: DataLoader workers, "
                          "Pillow) or device (TorchCodec on the run's device: nvjpeg on CUDA; kdbench[codec])")
    run.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                     help="torch.compile the student and the frozen models (MODE: default, reduce-overhead, "
                          "max-autotune, max-autotune-no-cudagraphs; default: default)")
    run.add_argument("--teacher-seeds", "--teacher-seed", dest="teacher_seeds",
                     help="comma-separated seeds of trained teachers (default 0); each teaches every student seed, "
                          "and the report keeps a row per teacher")
    run.add_argument("--val-split", type=int, metavar="N",
                     help="hold out N training images as the validation split that selects the reported epoch "
                          "(students, assistants and teachers alike; 0: none; default: the recipe's)")
    run.add_argument("--teacher-ckpt", help="use this checkpoint (RepDistiller format) as the teacher")
    run.add_argument("--data-dir", help="where datasets are found or downloaded to (default: $KDBENCH_DATA_DIR, else "
                                        "~/.cache/kdbench/data)")
    run.add_argument("--no-download", action="store_false", dest="download", help="never download datasets")
    run.add_argument("--results-dir",
                     help="where runs, the tidy table and the resolved sweep (sweep.yaml) go (default results)")
    run.add_argument("--reuse-stale", action="store_true",
                     help="keep finished runs that other code made instead of re-running them")
    run.add_argument("--retry-failed", action="store_true",
                     help="train again runs that diverged (a non-finite loss) under the current code; by default a "
                          "sweep keeps them failed, as a second try fails the same way")
    run.add_argument("--executor", choices=("local", "ray"),
                     help="local: one run after another in this process (default); ray: on a Ray cluster")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="attach to this Ray cluster (e.g. auto, ray://head:10001); default: start a local one")
    run.add_argument("--ray-cpus", type=int, metavar="N",
                     help="CPUs (threads) per run under Ray (default 1); CUDA runs also take one GPU each")
    run.add_argument("--runs-per-gpu", type=int, metavar="K",
                     help="K runs share each GPU, scheduled by Ray (default 1; fewer where memory is short)")
    run.add_argument("--log", metavar="SINKS",
                     help="also stream each run's spec and per-epoch metrics to: tensorboard, wandb (comma-separated;"
                          " W&B runs offline unless WANDB_MODE says otherwise)")
    run.add_argument("--dry-run", action="store_true", default=False,
                     help="print the plan, each run's resolved options and an estimate of its compute (a few "
                          "measured steps, their prices kept in $KDBENCH_CACHE); write nothing to the results")
    run.add_argument("--profile", action="store_true", default=False,
                     help="time each setting's training step by phase, against a fixed batch, a bare PyTorch loop "
                          "and the device's peak; write RESULTS_DIR/profile.parquet and a plot, train nothing")

    report = commands.add_parser("report", help="leaderboards (and plots) from the tidy results table")
    report.add_argument("--results-dir", type=Path, action="append", dest="results_dirs", metavar="DIR",
                        help="a results directory (default results/); repeat to combine several sets on purpose")
    report.add_argument("--format", default="github", choices=FORMATS, help="table format (default github)")
    report.add_argument("--metric", choices=METRICS,
                        help="top1_at_best_val: test top-1 at the epoch of best validation top-1 (default where every "
                             "run recorded it, else top1_best); top1_best: the best test epoch (selected on test, "
                             "as CRD and DKD report); top1_last: the last epoch")
    report.add_argument("--correction", default="holm", choices=tuple(CORRECTIONS),
                        help="multiple-comparison adjustment of the Δ p values over the methods of each table: holm "
                             "(default), bh (Benjamini-Hochberg) or none; * marks an adjusted p < 0.05")
    report.add_argument("--by", default="pair", choices=("pair", "setting"),
                        help="leaderboard layout: one table per pair (default) or per setting and protocol")
    report.add_argument("--layout", default="leaderboard", choices=LAYOUTS,
                        help="leaderboard: a table per pair with Δ, intervals, costs and sources (default); paper: "
                             "methods as rows and pairs as columns, an accuracy and a cost table per setting; regime: "
                             "whether each table's regime can carry a ranking (teacher above CE, CE seeds that agree, "
                             "converged students, the whole test set)")
    for name, what in (("dataset", "datasets"), ("recipe", "recipes"), ("protocol", "protocols"),
                       ("pairs", "TEACHER:STUDENT pairs"), ("methods", "methods (teacher and student rows stay)")):
        report.add_argument(f"--{name}", help=f"only these comma-separated {what}")
    report.add_argument("--published", type=Path, help="a published table (default: published_cifar100.csv and "
                        "published_imagenet.csv in the results dir, else in the kdbench checkout's results/)")
    report.add_argument("--plots", type=Path, metavar="DIR", help="also write the plots (PNG and SVG) here")
    report.add_argument("--pool-processes", action="store_true", help="pool runs that differ only in processes per "
                        "run (--gpus-per-run, BatchNorm rule); their img/s stays apart")
    report.add_argument("--out", type=Path, metavar="FILE", help="write the report here instead of stdout")

    replay = commands.add_parser("replay", help="train finished runs again with the current code and check that "
                                                "every number is the same; a run reproduced counts as this code's")
    replay.add_argument("--results-dir", type=Path, default=Path("results"), help="the results directory")
    replay.add_argument("--runs", default="*", help="comma-separated run ids or patterns (default: every finished run)")
    replay.add_argument("--epochs", type=int, help="compare the first N epochs of each run (default: all of them)")
    replay.add_argument("--data-dir", type=Path, help="where the datasets are (as for kdbench run)")

    costs = commands.add_parser("costs", help="price every finished run again in one sitting on this machine, so "
                                              "that the report's throughput and end-to-end columns compare methods")
    costs.add_argument("--results-dir", type=Path, default=Path("results"), help="the results directory")
    costs.add_argument("--runs", default="*", help="comma-separated run ids or patterns (default: every finished run)")
    costs.add_argument("--steps", type=int, default=20, help="timed training steps per setting (default 20)")
    costs.add_argument("--data-dir", type=Path, help="where the datasets are (as for kdbench run)")

    listing = commands.add_parser("list", help="list models, datasets, recipes and methods")
    listing.add_argument("what", nargs="?", default="all", choices=["all", "models", "datasets", "recipes", "methods"],
                         help="what to list (default all: the names); recipes and methods print their settings")
    listing.add_argument("name", nargs="?", help="with methods: one method's options, per protocol and per pair")
    return parser


def _set_options(given: list[str]) -> dict[str, dict[str, Any]]:
    """``--set`` flags as the sweep file's ``options``: a comma-separated value is a grid axis (a list)."""
    options: dict[str, dict[str, Any]] = {}
    for text in given:
        method, key, value = _option(text)
        if key in options.setdefault(method, {}):
            raise KdbenchError(f"--set {method}.{key} is given twice; give it once, with several values for a grid "
                               f"(--set {method}.{key}=A,B)")
        options[method][key] = value.split(",") if "," in value else value
    return options


_AS_LIST = {"methods": _names, "pairs": _names, "log": _names, "seeds": lambda text: _int_list(text, "--seeds"),
            "teacher_seeds": lambda text: _int_list(text, "--teacher-seeds")}


def _settings(args: argparse.Namespace) -> DictConfig:
    """The sweep: the file's (``--config``), with the flags given on the command line over it."""
    from kdbench.config import load

    given = {key: value for key, value in vars(args).items()
             if key not in ("command", "config", "dry_run", "profile", "argv")}
    given.update({key: list(_AS_LIST[key](given[key])) for key in _AS_LIST if key in given})
    if "options" in given:
        given["options"] = _set_options(given["options"])
    return load(getattr(args, "config", None), given)


def _sweeps(cfg: DictConfig) -> list[SweepSpec]:
    from kdbench.config import sweeps
    from kdbench.harness import sha256_file
    from kdbench.measure import resolve_device

    checkpoint = Path(cfg.teacher_ckpt) if cfg.teacher_ckpt else None
    if checkpoint is not None and not checkpoint.is_file():
        raise KdbenchError(f"teacher checkpoint {checkpoint} does not exist or is not a file")
    return sweeps(cfg, resolve_device(cfg.device).type,
                  sha256_file(checkpoint, "teacher checkpoint") if checkpoint else None)


def _check_teacher_ckpt(path: Path, sweep: SweepSpec) -> None:
    """Loads the checkpoint into the pairs' teacher architecture now, so a file that does not fit fails before any
    run starts."""
    from kdbench.data import dataset_info
    from kdbench.execution import load_weights
    from kdbench.models import create_model

    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        raise KdbenchError(f"teacher checkpoint {path} is empty (0 bytes)")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save writes a zip archive, or a pickle before 1.6
        raise KdbenchError(f"teacher checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive "
                           f"or a pickle; this file starts with {head!r})")
    info = dataset_info(sweep.dataset)
    load_weights(create_model(sweep.pairs[0].teacher, info.num_classes, info.in_channels), path, "teacher checkpoint")


def _small_teachers(sweep: SweepSpec) -> list[str]:
    """Pairs whose teacher has fewer parameters than its student: allowed (a reversed pair is an experiment of its
    own), but worth a word, as a typo (resnet8:resnet20 for resnet20:resnet8) looks the same."""
    import torch

    from kdbench.data import dataset_info
    from kdbench.models import create_model

    info = dataset_info(sweep.dataset)

    def size(arch: str) -> int:
        with torch.device("meta"):  # no memory, no initialisation
            return sum(p.numel() for p in create_model(arch, info.num_classes, info.in_channels).parameters())

    return [f"teacher {p.teacher} ({size(p.teacher) / 1e6:.2f} M parameters) is smaller than its student "
            f"{p.student} ({size(p.student) / 1e6:.2f} M); did you mean {p.student}:{p.teacher}?"
            for p in sweep.pairs if size(p.teacher) < size(p.student)]


def _teacher_lines(specs: list[RunSpec], env) -> list[str]:
    """For each teacher the sweep will train under a recipe the user did not name: which recipe, how long, its
    price on this machine, and how to change it; so that `--epochs 1` does not hide a 240-epoch teacher."""
    from kdbench.estimate import PriceCache, estimate
    from kdbench.progress import duration, epoch_images

    teachers = [spec for spec in specs if spec.role == "teacher" and not spec.pretrained]
    priced = estimate(teachers, env, prices=PriceCache.default()).runs if teachers else ()
    return [f"teacher {spec.student} (seed {spec.seed}) trains first, with recipe {spec.recipe.name}, which the "
            f"students' recipe names: {spec.recipe.epochs} epochs on {epoch_images(spec):,} images, about "
            f"{duration(price.seconds)} here; --teacher-recipe, --teacher-epochs or --teacher-train-subset change it"
            for spec, price in zip(teachers, priced) if price.status in ("train", "resume", "remake", "stale")]


def _show_progress_lines() -> None:
    """Progress lines on stderr when it is not a terminal (a log file, a batch scheduler), where progress bars turn
    themselves off; on a terminal the bars show, and only warnings get lines."""
    log = logging.getLogger("kdbench")
    for old in [h for h in log.handlers if getattr(h, "kdbench_cli", False)]:  # main() called again (tests)
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kdbench: %(message)s"))
    handler.kdbench_cli = True
    log.addHandler(handler)
    log.setLevel(logging.WARNING if sys.stderr.isatty() else logging.INFO)


def _run(args: argparse.Namespace) -> int:
    import torch

    from kdbench import distributed, packing
    from kdbench.config import SWEEP_NAME, plan, write_resolved
    from kdbench.executors import RayOptions, execute, follow_group, record_failed_run
    from kdbench.harness import RunEnv
    from kdbench.progress import check_sinks
    from kdbench.report import run_summary
    from kdbench.results import ResultsStore

    cfg = _settings(args)
    if cfg.source:
        print(f"kdbench: this sweep re-runs {cfg.source}", file=sys.stderr)
    sinks = tuple(cfg.log)
    check_sinks(sinks)
    if cfg.ray_cpus < 1:
        raise KdbenchError(f"--ray-cpus must be a positive integer, got {cfg.ray_cpus}")
    if cfg.executor not in ("local", "ray"):
        raise KdbenchError(f"unknown executor {cfg.executor!r}; valid executors: local, ray")
    if cfg.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise KdbenchError("--executor ray needs Ray: pip install 'kdbench[ray]'")
    results_dir = Path(cfg.results_dir)
    _writable_dir(results_dir, "--results-dir")
    sweeps = _sweeps(cfg)
    specs = plan(sweeps)
    packing.check(cfg.runs_per_gpu, sweeps[0].device, max(sweep.world_size for sweep in sweeps))
    checkpoint = Path(cfg.teacher_ckpt).resolve() if cfg.teacher_ckpt else None
    if checkpoint:
        _check_teacher_ckpt(checkpoint, sweeps[0])
    for line in dict.fromkeys(line for sweep in sweeps for line in _small_teachers(sweep)):
        print(f"kdbench: warning: {line}", file=sys.stderr)
    # Absolute paths: Ray workers run in the directory their node started in, not in this one.
    checkpoints = {sweeps[0].teacher_ckpt_sha256: checkpoint} if checkpoint else {}
    store = ResultsStore(results_dir.resolve())
    env = RunEnv(store, Path(cfg.data_dir).resolve() if cfg.data_dir else None, cfg.download, checkpoints,
                 reuse_stale=cfg.reuse_stale, retry_failed=cfg.retry_failed, sinks=sinks)
    if args.dry_run:
        from kdbench.estimate import PriceCache, estimate, format_estimate

        est = estimate(specs, env, prices=PriceCache.default())
        print(format_estimate(est, per_run=True))
        print(packing.dry_run_text(est, cfg.runs_per_gpu), end="")  # after the table: a refusal keeps it
        return 0
    if args.profile:
        from kdbench.profile import format_profile, profile, save

        table = profile(specs, env)
        path = save(table, results_dir)
        print(format_profile(table))
        print(f"\nprofile table: {path} (plot: {path.with_suffix('.png')})")
        return 0
    launched = distributed.launched_world_size() > 1  # this is one of a group's processes
    if launched and cfg.executor != "local":
        raise KdbenchError(f"--executor {cfg.executor} under torchrun: the executor starts each run's processes "
                           f"itself (--gpus-per-run); run kdbench once, without torchrun")
    if not launched:  # said once, before a group starts (pricing a teacher trains a few steps)
        _say_before(cfg, specs, env, sweeps[0])
    if not launched and sweeps[0].world_size > 1 and cfg.executor == "local":
        return distributed.launch(sweeps[0].world_size, sweeps[0].device, args.argv,
                                  functools.partial(record_failed_run, env))
    if distributed.join(torch.device(sweeps[0].device)).rank > 0:
        logging.getLogger("kdbench").setLevel(logging.WARNING)  # rank 0 tells the group's progress
        try:
            follow_group(env)
        finally:
            distributed.leave()
        return 0
    _show_progress_lines()
    try:
        failed = distributed.failed_in_earlier_groups()  # by a process that raised in them: recorded, not retried
        records = execute([spec for spec in specs if spec.run_id not in failed], env, cfg.executor,
                          RayOptions(cfg.ray_address, cfg.ray_cpus), packing.pack(specs, env, cfg.runs_per_gpu))
        records += [store.load_record(run) for run in sorted(failed)]
    finally:  # beside whatever runs were made, even by a sweep that stopped; nothing when none was
        with contextlib.suppress(RuntimeError):  # the other processes of a run trained by several stop, unless
            distributed.announce(None)  # the error that ends the sweep broke their group
            distributed.leave()
        if any(store.run_dir(spec.run_id).exists() for spec in specs):
            written = write_resolved(cfg, specs, results_dir)
            print(f"kdbench: the resolved sweep: {results_dir / SWEEP_NAME} (kept as {written})", file=sys.stderr)
    print(run_summary(records))
    print(f"\ntidy table: {results_dir / 'metrics.parquet'} (CSV: {results_dir / 'metrics.csv'})")
    return 1 if any(r.status == "failed" for r in records) else 0


def _say_before(cfg: DictConfig, specs: list, env, sweep: SweepSpec) -> None:
    """What the sweep will do that a user should know first: teachers it trains, a slow setting, stale runs."""
    import torch

    from kdbench.fingerprint import stale_runs
    from kdbench.profile import slow_setting_note

    if not (cfg.teacher_recipe or cfg.teacher_epochs or cfg.teacher_train_subset):
        for line in _teacher_lines(specs, env):
            print(f"kdbench: {line}", file=sys.stderr)
    note = slow_setting_note(torch.device(sweep.device), cfg.precision, cfg.channels_last)
    if note:
        print(f"kdbench: warning: {note}", file=sys.stderr)
    stale = stale_runs(specs, env.store)
    if stale:
        changed = sorted({m for reason in stale.values() for m in reason.split(", ")})
        what = "kept (--reuse-stale)" if cfg.reuse_stale else "re-run"
        print(f"kdbench: {len(stale)} finished run(s) were made by other code and will be {what}: "
              f"{', '.join(stale)} (changed: {', '.join(changed)})", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from kdbench.report import report

    if args.out:
        if args.out.is_dir():
            raise KdbenchError(f"--out {args.out} is a directory; name the file to write the report to")
        _writable_dir(args.out.parent, "--out")
    if args.plots:
        _writable_dir(args.plots, "--plots")
    text, plots = report(args.results_dirs or [Path("results")], args.format, args.metric, args.by, args.published,
                         args.plots, layout=args.layout, correction=args.correction,
                         pool_processes=args.pool_processes, dataset=args.dataset,
                         recipe=args.recipe, protocol=args.protocol, pairs=args.pairs, methods=args.methods)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text, end="")
    if plots:
        print(f"{len(plots)} plot files in {args.plots}", file=sys.stderr)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from kdbench.replay import replay
    from kdbench.results import ResultsStore

    store = ResultsStore(args.results_dir)
    _show_progress_lines()
    outcomes = replay(store, store.chosen_runs(args.runs), args.epochs, args.data_dir)
    for outcome in outcomes:
        print(outcome.line())
    counts = {status: sum(o.status == status for o in outcomes) for status in ("reproduced", "current", "differs",
                                                                                  "skipped")}
    print(", ".join(f"{n} {status}" for status, n in counts.items() if n), file=sys.stderr)
    return 1 if counts["differs"] else 0


def _costs(args: argparse.Namespace) -> int:
    from kdbench import costs
    from kdbench.results import ResultsStore

    if args.steps < 1:
        raise KdbenchError(f"--steps {args.steps}: give at least 1 timed step per setting (default 20)")
    store = ResultsStore(args.results_dir)
    frame, left_out = costs.sitting(store, store.chosen_runs(args.runs), args.steps, data_dir=args.data_dir,
                                    say=lambda line: print(f"kdbench: {line}", file=sys.stderr, flush=True))
    path = costs.write(args.results_dir, frame)
    for line in left_out:
        print(f"kdbench: not priced: {line}", file=sys.stderr)
    print(f"{frame['run_id'].nunique()} finished runs priced in one sitting ({frame['sitting'].iloc[0]}), "
          f"{len(left_out)} left out: {path}; `kdbench report` takes costs from it", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from kdbench import listing

    print(listing.listing(args.what, args.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --gpus-per-run starts again in each process
        return {"run": _run, "report": _report, "replay": _replay, "costs": _costs, "list": _list}[args.command](args)
    except KdbenchError as e:
        print(f"kdbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGINT, in a run or between runs: what is done is kept
        print("kdbench: interrupted; the same command resumes (finished runs are kept, a run in progress goes on from "
              "its last epoch)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
