"""``kdbench`` command line: parse arguments into a sweep spec, hand it to the harness, print results.

User mistakes end with one line on stderr and exit status 2; nothing is written before validation.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from kdbench.errors import KdbenchError
from kdbench.report import CORRECTIONS, FORMATS, LAYOUTS, METRICS
from kdbench.spec import PROTOCOLS, RECIPES, Pair, SweepSpec, teacher_recipe_of


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
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="train teachers and students, write tidy results")
    run.add_argument("--methods", required=True, help="comma-separated method names (see `kdbench list methods`)")
    run.add_argument("--pairs", required=True, help="comma-separated TEACHER:STUDENT pairs, e.g. vgg13:vgg8")
    run.add_argument("--dataset", default="cifar100")
    run.add_argument("--seeds", default="0", help="comma-separated student seeds (default 0)")
    run.add_argument("--recipe", default="paper",
                     help="students' recipe: paper (RepDistiller, 240 epochs), letkd-native, cpu (the CPU benchmark) "
                          "or short (a CPU smoke run); see `kdbench list recipes`")
    run.add_argument("--epochs", type=int, help="override the recipe's epochs (lr milestones scale along)")
    run.add_argument("--batch-size", type=int, help="override the recipe's training batch size")
    run.add_argument("--train-subset", type=int, help="train on a fixed subset of this many images")
    run.add_argument("--test-subset", type=int, help="evaluate on a fixed subset of this many test images")
    run.add_argument("--lr", type=float, help="override the base learning rate")
    run.add_argument("--teacher-recipe", help="teachers' recipe (default: the one the students' recipe names)")
    run.add_argument("--teacher-epochs", type=int, help="override the teacher recipe's epochs")
    run.add_argument("--teacher-train-subset", type=int, help="train teachers on a fixed subset of this many images")
    run.add_argument("--teacher-lr", type=float, help="override the teacher recipe's base learning rate")
    run.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE", dest="options",
                     help="a method option, e.g. fitnet.hint_layer=1 (repeatable; see `kdbench list methods`)")
    run.add_argument("--ta-chain", action="append", default=[], metavar="TEACHER:TA1:...:STUDENT",
                     help="teacher-assistant chain for takd/dgkd (repeatable, one per pair); default per pair")
    run.add_argument("--protocol", default=PROTOCOLS[0],
                     help=f"loss-weight preset: {', '.join(PROTOCOLS)} (default {PROTOCOLS[0]}: each method as its "
                          "official code runs it)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    run.add_argument("--amp", action="store_const", const="bf16", default="fp32", dest="precision",
                     help="bf16 autocast around the forwards (parameters stay fp32)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    run.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                     help="torch.compile the student and the frozen models (MODE: default, reduce-overhead, "
                          "max-autotune, max-autotune-no-cudagraphs; default: default)")
    run.add_argument("--teacher-seeds", "--teacher-seed", default="0", dest="teacher_seeds",
                     help="comma-separated seeds of trained teachers (default 0); each teaches every student seed, "
                          "and the report keeps a row per teacher")
    run.add_argument("--val-split", type=int, metavar="N",
                     help="hold out N training images as the validation split that selects the reported epoch "
                          "(students, assistants and teachers alike; 0: none; default: the recipe's)")
    run.add_argument("--teacher-ckpt", type=Path, help="use this checkpoint (RepDistiller format) as the teacher")
    run.add_argument("--data-dir", type=Path, help="where datasets are found or downloaded to")
    run.add_argument("--no-download", action="store_true", help="never download datasets")
    run.add_argument("--results-dir", type=Path, default=Path("results"))
    run.add_argument("--reuse-stale", action="store_true",
                     help="keep finished runs that other code made instead of re-running them")
    run.add_argument("--retry-failed", action="store_true",
                     help="train again runs that diverged (a non-finite loss) under the current code; by default a "
                          "sweep keeps them failed, as a second try fails the same way")
    run.add_argument("--executor", default="local", choices=("local", "ray"),
                     help="local: one run after another in this process (default); ray: on a Ray cluster")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="attach to this Ray cluster (e.g. auto, ray://head:10001); default: start a local one")
    run.add_argument("--ray-cpus", type=int, default=1, metavar="N",
                     help="CPUs (threads) per run under Ray (default 1); CUDA runs also take one GPU each")
    run.add_argument("--log", default="", metavar="SINKS",
                     help="also stream each run's spec and per-epoch metrics to: tensorboard, wandb (comma-separated;"
                          " W&B runs offline unless WANDB_MODE says otherwise)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the plan and an estimate of its compute (a few measured steps); write nothing")
    run.add_argument("--profile", action="store_true",
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
    report.add_argument("--published", type=Path, help="published CIFAR-100 table (default: results/"
                        "published_cifar100.csv in the results dir, else in the kdbench checkout)")
    report.add_argument("--plots", type=Path, metavar="DIR", help="also write the plots (PNG and SVG) here")
    report.add_argument("--out", type=Path, metavar="FILE", help="write the report here instead of stdout")

    listing = commands.add_parser("list", help="list models, datasets, recipes and methods")
    listing.add_argument("what", nargs="?", default="all", choices=["all", "models", "datasets", "recipes", "methods"])
    return parser


def _sweep(args: argparse.Namespace) -> SweepSpec:
    from kdbench.harness import sha256_file
    from kdbench.measure import resolve_device

    if args.teacher_ckpt is not None and not args.teacher_ckpt.is_file():
        raise KdbenchError(f"teacher checkpoint {args.teacher_ckpt} does not exist or is not a file")
    recipe = RECIPES.get(args.recipe).overridden(epochs=args.epochs, batch_size=args.batch_size,
                                                 train_subset=args.train_subset,
                                                 test_subset=args.test_subset, lr=args.lr, val_split=args.val_split)
    teacher_recipe = (RECIPES.get(args.teacher_recipe) if args.teacher_recipe else teacher_recipe_of(recipe))
    # A validation split is a partition of the data, so the teachers hold out the same images: none of its labels
    # reaches a student through its teacher.
    teacher_recipe = teacher_recipe.overridden(epochs=args.teacher_epochs, train_subset=args.teacher_train_subset,
                                               lr=args.teacher_lr, what="--teacher-").overridden(
        val_split=args.val_split)
    return SweepSpec(
        methods=_names(args.methods), pairs=tuple(Pair.parse(p) for p in _names(args.pairs)),
        seeds=_int_list(args.seeds, "--seeds"), dataset=args.dataset, recipe=recipe, teacher_recipe=teacher_recipe,
        protocol=args.protocol,
        device=resolve_device(args.device).type, precision=args.precision, channels_last=args.channels_last,
        compile=args.compile,
        teacher_seeds=_int_list(args.teacher_seeds, "--teacher-seeds"),
        method_options=tuple(_option(o) for o in args.options),
        ta_chains=tuple(tuple(c.split(":")) for c in args.ta_chain),
        teacher_ckpt_sha256=sha256_file(args.teacher_ckpt, "teacher checkpoint") if args.teacher_ckpt else None)


def _check_teacher_ckpt(path: Path, sweep: SweepSpec) -> None:
    """Loads the checkpoint into the pairs' teacher architecture now, so a file that does not fit fails before any
    run starts."""
    from kdbench.data import dataset_info
    from kdbench.execution import load_weights
    from kdbench.models import create_model

    info = dataset_info(sweep.dataset)
    load_weights(create_model(sweep.pairs[0].teacher, info.num_classes, info.in_channels), path, "teacher checkpoint")


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

    from kdbench.executors import RayOptions, execute
    from kdbench.fingerprint import stale_runs
    from kdbench.harness import RunEnv
    from kdbench.profile import slow_setting_note
    from kdbench.progress import check_sinks
    from kdbench.report import run_summary
    from kdbench.results import ResultsStore

    sinks = _names(args.log)
    check_sinks(sinks)
    if args.ray_cpus < 1:
        raise KdbenchError(f"--ray-cpus must be a positive integer, got {args.ray_cpus}")
    if args.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise KdbenchError("--executor ray needs Ray: pip install 'kdbench[ray]'")
    _writable_dir(args.results_dir, "--results-dir")
    sweep = _sweep(args)
    specs = sweep.plan()
    if args.teacher_ckpt:
        _check_teacher_ckpt(args.teacher_ckpt, sweep)
    # Absolute paths: Ray workers run in the directory their node started in, not in this one.
    checkpoints = {sweep.teacher_ckpt_sha256: args.teacher_ckpt.resolve()} if args.teacher_ckpt else {}
    store = ResultsStore(args.results_dir.resolve())
    env = RunEnv(store, args.data_dir.resolve() if args.data_dir else None, not args.no_download, checkpoints,
                 reuse_stale=args.reuse_stale, retry_failed=args.retry_failed, sinks=sinks)
    if args.dry_run:
        from kdbench.estimate import estimate, format_estimate

        print(format_estimate(estimate(specs, env)))
        return 0
    if args.profile:
        from kdbench.profile import format_profile, profile, save

        table = profile(specs, env)
        path = save(table, args.results_dir)
        print(format_profile(table))
        print(f"\nprofile table: {path} (plot: {path.with_suffix('.png')})")
        return 0
    note = slow_setting_note(torch.device(sweep.device), sweep.precision, sweep.channels_last)
    if note:
        print(f"kdbench: warning: {note}", file=sys.stderr)
    stale = stale_runs(specs, store)
    if stale:
        changed = sorted({m for reason in stale.values() for m in reason.split(", ")})
        what = "kept (--reuse-stale)" if args.reuse_stale else "re-run"
        print(f"kdbench: {len(stale)} finished run(s) were made by other code and will be {what}: "
              f"{', '.join(stale)} (changed: {', '.join(changed)})", file=sys.stderr)
    _show_progress_lines()
    records = execute(specs, env, args.executor, RayOptions(args.ray_address, args.ray_cpus))
    print(run_summary(records))
    print(f"\ntidy table: {args.results_dir / 'metrics.parquet'} (CSV: {args.results_dir / 'metrics.csv'})")
    return 1 if any(r.status == "failed" for r in records) else 0


def _report(args: argparse.Namespace) -> int:
    from kdbench.report import report

    if args.out:
        if args.out.is_dir():
            raise KdbenchError(f"--out {args.out} is a directory; name the file to write the report to")
        _writable_dir(args.out.parent, "--out")
    if args.plots:
        _writable_dir(args.plots, "--plots")
    text, plots = report(args.results_dirs or [Path("results")], args.format, args.metric, args.by, args.published,
                         args.plots, layout=args.layout, correction=args.correction, dataset=args.dataset,
                         recipe=args.recipe, protocol=args.protocol, pairs=args.pairs, methods=args.methods)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text, end="")
    if plots:
        print(f"{len(plots)} plot files in {args.plots}", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from kdbench.data import list_datasets
    from kdbench.methods import list_methods, method_class
    from kdbench.models import list_models

    def methods() -> list[str]:  # each with its options and defaults, e.g. fitnet[hint_layer=2 beta=100.0]
        shown = []
        for name in list_methods():
            options = " ".join(f"{k}={v}" for k, v in method_class(name).defaults.items())
            shown.append(f"{name}[{options}]" if options else name)
        return shown

    listings = {"models": list_models, "datasets": list_datasets, "recipes": RECIPES.names, "methods": methods}
    for what, names in listings.items():
        if args.what in ("all", what):
            print(f"{what}: {', '.join(names())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"run": _run, "report": _report, "list": _list}[args.command](args)
    except KdbenchError as e:
        print(f"kdbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
