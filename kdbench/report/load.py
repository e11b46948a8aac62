"""Reading results: the tidy tables of results directories, and one row per finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from kdbench.errors import KdbenchError

_REQUIRED = ("run_id", "status", "role", "method", "dataset", "teacher", "student", "pair", "protocol", "recipe",
             "seed", "device", "precision", "metric", "value", "epoch")
_OPTIONAL = {"error": None, "method_options": "", "method_overrides": "", "assistants": "", "method_note": "",
             "method_label": None, "method_family": None, "teacher_run": None, "device_name": None, "epochs": None,
             "batch_size": None, "train_subset": None, "test_subset": None, "lr": None, "channels_last": False,
             "compile": None, "teacher_seed": None, "teacher_pool": None, "assistant_runs": None, "val_split": None,
             "code_fingerprint": None, "code_core": None, "git_sha": None, "git_dirty": None,
             "replayed_code_fingerprint": None, "replayed_code_core": None, "replayed_epochs": None,
             "data_backend": None, "world_size": None, "sync_bn": None, "device_shared_by": None,
             "cost_sitting": None, "cost_sitting_id": None}
_RUN_METRICS = ("top1_at_best_val", "top1_best", "top1_last", "train_images_per_s", "peak_alloc_bytes",
                "peak_reserved_bytes", "cpu_peak_rss_bytes", "extra_params_train", "inference_params", "wall_s",
                "prepare_s", "reused_fit_s", "teacher_wall_s", "assistant_wall_s")
MEMORY_NAMES = {"peak_alloc_bytes": "CUDA max allocated", "peak_reserved_bytes": "CUDA max reserved",
                "cpu_peak_rss_bytes": "CPU peak RSS"}


def memory_name(frame: pd.DataFrame) -> str:
    """What a table's peak memory measures (its runs' ``memory_metric``)."""
    memory = frame["memory_metric"].dropna()
    return MEMORY_NAMES[memory.iloc[0]] if len(memory) else "not measured"


def load_results(results_dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """The tidy tables of one or more results directories, concatenated; a run found in several is kept once,
    from the first that holds it (``results_dir``: where each run was read; ``also_in``: where else it is)."""
    dirs = [results_dirs] if isinstance(results_dirs, (str, Path)) else list(results_dirs)
    if not dirs:
        raise KdbenchError("no results directory given")
    loaded = [_load_dir(d) for d in dict.fromkeys(Path(d) for d in dirs)]
    table = pd.concat([t for t, _ in loaded], ignore_index=True)
    where = table[["run_id", "results_dir"]].drop_duplicates().groupby("run_id", sort=False)["results_dir"].agg(list)
    table = table[table["results_dir"] == table["run_id"].map(where.str[0])].reset_index(drop=True)
    table["also_in"] = table["run_id"].map(where.str[1:].str.join(", "))
    table.attrs["unreadable"] = [line for _, lines in loaded for line in lines]
    return table


def _load_dir(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """The tidy table of one results directory, read from its run folders (never a table older than they are), and
    a line per run folder that could not be read; one clear KdbenchError when nothing is there. A directory that
    holds only the all-runs table (copied without its run folders) is read from that table."""
    from kdbench.results import TABLE_NAME, ResultsStore

    if root.exists() and not root.is_dir():
        raise KdbenchError(f"results directory {root} is a file; give the folder that `kdbench run --results-dir` "
                           f"wrote (default results)")
    if not root.is_dir():
        raise KdbenchError(f"results directory {root} does not exist; run `kdbench run --results-dir {root}` first")
    table, unreadable = ResultsStore(root).read_table(repair=False)
    path = root / f"{TABLE_NAME}.parquet"
    if table.empty and not unreadable:
        path = next((p for p in (path, root / f"{TABLE_NAME}.csv") if p.is_file()), None)
        if path is None:
            raise KdbenchError(f"results directory {root} holds no runs; run `kdbench run --results-dir {root}` first")
        try:
            table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception as error:  # a truncated or foreign file
            raise KdbenchError(f"cannot read {path}: {' '.join(str(error).split())}") from None
    if table.empty:
        raise KdbenchError(f"{root} holds no readable runs ({'; '.join(unreadable)})" if unreadable else
                           f"{root} holds no runs; run `kdbench run --results-dir {root}` first")
    return _with_sitting(conform(table, str(path)), root).assign(results_dir=str(root)), unreadable


def _with_sitting(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """``table`` and, as run-level rows of the runs it holds, the costs that ``kdbench costs`` priced for them in one
    sitting (``kdbench.costs``), each naming its sitting (``cost_sitting``, ``cost_sitting_id``). A run made again
    since the sitting (another record timestamp) is not the run it priced: its rows are left out."""
    from kdbench import costs
    from kdbench.results import unit_of

    sitting = costs.read(root)
    if sitting is None:
        return table
    identity = table.drop_duplicates("run_id").set_index("run_id").drop(columns=["metric", "value", "epoch"])
    same_run = sitting["run_timestamp"].to_numpy() == sitting["run_id"].map(identity.get("timestamp")).to_numpy()
    priced = sitting[sitting["run_id"].isin(identity.index) & same_run]
    rows = identity.loc[priced["run_id"]].reset_index().assign(
        metric=priced["metric"].to_numpy(), value=priced["value"].to_numpy(), epoch=float("nan"),
        cost_sitting=priced["sitting"].to_numpy(), cost_sitting_id=priced["sitting_id"].to_numpy())
    if "unit" in rows:
        rows["unit"] = rows["metric"].map(unit_of)
    if "split" in rows:
        rows["split"] = "na"  # run-level, as a record's own run metrics
    return pd.concat([table, rows], ignore_index=True)


def conform(table: pd.DataFrame, source: str = "the table") -> pd.DataFrame:
    """``table`` with every column the report reads: the required ones checked, the optional ones that older
    kdbench versions did not write added with their defaults."""
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise KdbenchError(f"{source} lacks column(s) {', '.join(missing)}: it was written by an older kdbench; "
                           f"re-run the sweep with this version into a new --results-dir")
    return table.assign(**{c: default for c, default in _OPTIONAL.items() if c not in table.columns})


def duplicate_runs(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run that :func:`load_results` found in more than one results directory."""
    return table[table["also_in"] != ""].drop_duplicates("run_id")[["run_id", "results_dir", "also_in"]]


_RECIPE_PARTS = (("epochs", "{:.0f} epochs"), ("batch_size", "batch {:.0f}"), ("train_subset", "{:.0f} train images"),
                 ("test_subset", "{:.0f} test images"), ("lr", "lr {:g}"), ("val_split", "{:.0f} validation images"))


def _setting_label(run: pd.Series) -> str:
    """What runs must share to be pooled: dataset, recipe (with its overrides and validation split), device type,
    precision, data backend and processes per run (with their BatchNorm). Not the device's model: runs that differ
    only in GPU model pool, and their tables list the models (:func:`device_names`)."""
    recipe = ", ".join(text.format(run[key]) for key, text in _RECIPE_PARTS if pd.notna(run[key]))
    device = run["device"] + (", decoded on the device" if run["data_backend"] == "device" else "")
    if pd.notna(run["world_size"]) and run["world_size"] > 1:
        device += f", {run['world_size']:.0f} processes" + (" (sync BN)" if run["sync_bn"] is True else "")
    precision = (run["precision"] + (", channels_last" if str(run["channels_last"]) == "True" else "")
                 + (f", compiled ({run['compile']})" if pd.notna(run["compile"]) else ""))
    return " · ".join([run["dataset"], f"recipe {run['recipe']}" + (f" ({recipe})" if recipe else ""),
                       device, precision])


def pooled_processes(table: pd.DataFrame) -> pd.DataFrame:
    """``kdbench report --pool-processes``: runs that differ only in the processes that trained each (world size and
    BatchNorm rule) as one setting. The user declares them equivalent: the batch is the global one and the recipe's lr
    is the same, but per-rank BatchNorm sees 1/N of it, so the numbers differ beyond rounding (with --sync-bn, within
    it: docs/scale-out.md). Their img/s stays apart: a run of N processes counts as another device (global img/s)."""
    processes = pd.to_numeric(table["world_size"], errors="coerce").fillna(1)
    suffix = " x" + processes.astype(int).astype(str) + " processes" + table["sync_bn"].eq(True).map(
        {True: " (sync BN)", False: ""})
    return table.assign(device_name=_as_other_device(table["device_name"], processes > 1, suffix), world_size=None,
                        sync_bn=None)


def _as_other_device(names: pd.Series, other: pd.Series, suffix: pd.Series) -> pd.Series:
    """Device names with ``suffix`` where ``other``: runs whose speed and memory are not a dedicated device's (a
    shared GPU, several processes), which reports then keep apart as they keep device models apart."""
    return names.where(~other, names.astype(str) + suffix)


def runs(table: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run: identity, ``setting`` (what must match to pool runs) and run-level metrics."""
    done = table[table["status"] == "finished"]
    if done.empty:
        raise KdbenchError(f"the results table holds no finished run ({_unfinished_line(table)})")
    identity = [c for c in table.columns if c not in ("metric", "value", "unit", "epoch", "split")]
    wide = done.drop_duplicates("run_id")[identity].set_index("run_id")
    level = done[done["epoch"].isna()].pivot_table(index="run_id", columns="metric", values="value",
                                                   aggfunc="first")
    level.columns = [str(c) for c in level.columns]
    wide = wide.join(level.reindex(columns=list(dict.fromkeys([*level.columns, *_RUN_METRICS])))).join(
        _last_gains(done))
    wide = _sitting_costs(wide, done)
    wide["memory_metric"] = wide["peak_alloc_bytes"].notna().map({True: "peak_alloc_bytes",
                                                                  False: "cpu_peak_rss_bytes"})
    wide["peak_bytes"] = wide["peak_alloc_bytes"].fillna(wide["cpu_peak_rss_bytes"])
    # A GPU that k runs shared (--runs-per-gpu, kdbench.packing) is another device as far as speed goes: its img/s is
    # never averaged with a dedicated GPU's (tables that pool both show them per device: kdbench.report.aggregate).
    shared = pd.to_numeric(wide["device_shared_by"], errors="coerce").fillna(1)
    wide["device_name"] = _as_other_device(wide["device_name"], shared > 1,
                                           " shared by " + shared.astype(int).astype(str) + " runs")
    seeds = table.drop_duplicates("run_id").set_index("run_id")["seed"]
    own_seed = wide["seed"].where(wide["role"] == "teacher")
    wide["teacher_seed"] = pd.to_numeric(wide["teacher_seed"], errors="coerce").fillna(own_seed).fillna(
        wide["teacher_run"].map(seeds))
    # A run that later code replayed number for number (kdbench replay) counts as that code's.
    replayed = wide["replayed_code_fingerprint"].notna()
    for column in ("code_fingerprint", "code_core"):
        wide[column] = wide[f"replayed_{column}"].where(replayed, wide[column])
    wide["setting"] = [_setting_label(run) for _, run in wide.iterrows()]
    wide["family"] = wide["method_family"].fillna(wide["method"].map(family_of))
    wide = wide.reset_index()
    wide["end_to_end_s"], wide["assistants_in_full"] = amortised_costs(wide)
    return wide


def _last_gains(done: pd.DataFrame) -> pd.DataFrame:
    """Per run, ``top1_last_gain`` and ``val_top1_last_gain``: its last evaluation's accuracy minus the one before
    (NaN with fewer than two), how much a run whose best epoch is its last was still rising when it stopped."""
    curves = done[done["epoch"].notna() & done["metric"].isin(["top1", "val_top1"])].sort_values("epoch")
    gains = curves.groupby(["run_id", "metric"])["value"].agg(lambda v: v.iloc[-1] - v.iloc[-2] if len(v) > 1
                                                               else float("nan")).unstack()
    return gains.reindex(columns=["top1", "val_top1"]).add_suffix("_last_gain")


def best_at_last(runs: pd.DataFrame, epoch_column: str = "top1_best_epoch",
                 gain_column: str = "top1_last_gain") -> tuple[int, int, float]:
    """Of ``runs`` (rows of :func:`runs`): how many picked their last epoch (``epoch_column`` equals
    ``epochs_completed``), how many record both, and the mean ``gain_column`` of the first (NaN for none). A run
    best at its last epoch may still have been rising; its last rise tells a plateau's noise from a run cut short."""
    if epoch_column not in runs or "epochs_completed" not in runs:
        return 0, 0, float("nan")
    recorded = runs[epoch_column].notna() & runs["epochs_completed"].notna()
    at_last = recorded & runs[epoch_column].eq(runs["epochs_completed"])
    return int(at_last.sum()), int(recorded.sum()), float(runs.loc[at_last, gain_column].mean())


def _sitting_costs(wide: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
    """The sitting that priced each run (``kdbench costs``; ``cost_sitting``, ``cost_sitting_id``, None where none
    did) and ``sitting_end_to_end_s``, the end-to-end cost under its prices: the run's price (its offline fit
    included) and its share of its teacher's and assistants' prices, where the same sitting priced all of them;
    NaN elsewhere. The runs' own figures stay where they are (``report.aggregate.shown_costs`` picks per row)."""
    sittings = done.dropna(subset=["cost_sitting_id"]).drop_duplicates("run_id").set_index("run_id")
    wide = wide.assign(cost_sitting=sittings["cost_sitting"].reindex(wide.index),
                       cost_sitting_id=sittings["cost_sitting_id"].reindex(wide.index))
    if "sitting_run_s" not in wide:
        return wide.assign(sitting_train_images_per_s=float("nan"), sitting_end_to_end_s=float("nan"))
    own_id = wide["cost_sitting_id"]
    trainers = wide["teacher_run"].map(lambda run: [run] if isinstance(run, str) else []) + wide[
        "assistant_runs"].map(lambda runs: runs.split(":") if isinstance(runs, str) and runs else [])
    complete = own_id.notna() & pd.Series([all(own_id.get(r) == mine for r in runs)
                                           for runs, mine in zip(trainers, own_id)], index=wide.index)
    complete &= ~(wide["assistant_wall_s"].fillna(0).gt(0) & wide["assistant_runs"].fillna("").eq(""))
    priced = wide.assign(wall_s=wide["sitting_run_s"], prepare_s=0.0, reused_fit_s=0.0,
                         teacher_wall_s=wide["teacher_run"].map(wide["sitting_run_s"]))
    end_to_end = pd.Series(amortised_costs(priced.reset_index())[0].to_numpy(), index=wide.index)
    return wide.assign(sitting_end_to_end_s=end_to_end.where(complete))


def amortised_costs(wide: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each run's end-to-end cost: its own training, preparation and reused fitting, plus its *share* of the teacher
    and assistants it learned from (their wall time over the number of finished students of the results that learned
    from them), so that runs sharing one teacher compare with the CE run that needs none; the teacher's full cost sits
    on the teacher's row (its wall time). Without ``assistant_runs`` (older tables), or with an assistant run missing
    from the results, a run's assistants are charged in full (True in the second series)."""
    students = wide[wide["role"] == "student"]
    own = wide["wall_s"] + wide["prepare_s"].fillna(0) + wide["reused_fit_s"].fillna(0)
    teacher_share = wide["teacher_wall_s"] / wide["teacher_run"].map(students["teacher_run"].value_counts())
    chains = wide["assistant_runs"].where(wide["assistant_runs"].fillna("") != "").str.split(":")
    users = chains[wide["role"] == "student"].explode().value_counts()
    wall = wide.set_index("run_id")["wall_s"].dropna()
    known = chains.map(lambda runs: isinstance(runs, list) and all(r in wall.index for r in runs))
    shared = chains[known].map(lambda runs: sum(wall[r] / users.get(r, 1) for r in runs))
    assistant_share = shared.reindex(wide.index).fillna(wide["assistant_wall_s"])
    in_full = ~known & wide["assistant_wall_s"].fillna(0).gt(0)
    return own + teacher_share.fillna(0) + assistant_share.fillna(0), in_full


def device_names(frame: pd.DataFrame) -> list[str]:
    """The device models of ``frame``'s runs (leaderboard rows hold them ", "-joined), in order of appearance."""
    return list(dict.fromkeys(name for text in frame["device_name"].dropna() for name in str(text).split(", ")))


def family_of(method: str) -> str:
    """The family a method declares (``Method.family``), for tables that did not record it (``method_family``);
    "other" for a method this installation does not have."""
    from kdbench.methods import method_class

    try:
        return method_class(method).family
    except KdbenchError:
        return "other"


def unfinished(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run that did not finish (failed or interrupted), with its error."""
    columns = ["run_id", "status", "role", "method", "method_label", "method_overrides", "student", "pair", "seed",
               "error"]
    return table[table["status"] != "finished"].drop_duplicates("run_id")[columns]


def describe(bad: pd.DataFrame) -> str:
    """Runs that did not finish, one clause each: what, seed, status and error."""
    return "; ".join((r.method_label if isinstance(r.method_label, str) and r.method_label else r.method)
                     + (f"[{r.method_overrides}]" if isinstance(r.method_overrides, str) and r.method_overrides else "")
                     + f" {r.pair if isinstance(r.pair, str) else r.student} seed {r.seed}: {r.status}"
                     + (f" ({r.error})" if isinstance(r.error, str) and r.error else "") for r in bad.itertuples())


def _unfinished_line(table: pd.DataFrame) -> str:
    bad = unfinished(table)
    return f"{len(bad)} not finished: {describe(bad)}" if len(bad) else "no runs"
