"""Human-readable views of results: the per-run summary, leaderboards, paired comparisons and plots.

Everything here except :func:`run_summary` reads only the tidy results table (``<results>/metrics.parquet``,
see ``kdbench.results``) and the published CIFAR-100 table (``results/published_cifar100.csv``). Aggregation
follows harness-performance.md §3.2: finished runs only; mean ± sample std (ddof = 1) with ``n`` over seeds;
Δ against the CE-trained student of the same setting, paired by seed, with a 95 % t interval; runs of different
datasets, recipes, protocols, devices or precisions are never pooled. Rows whose runs were made by other code
than the rest of their table (``code_core``, ``code_fingerprint``) are marked.

Pipeline: :func:`load_results` → :func:`entries` (one row per run and table it appears in) →
:func:`leaderboard` (one row per table row) → :func:`render_report`; :func:`groups` + ``plot_*`` for figures.
"""

from __future__ import annotations

import html
import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import pandas as pd
from tabulate import tabulate

from kdbench.errors import KdbenchError

if TYPE_CHECKING:  # kdbench.results imports torch: the CLI imports this module for its choices
    from kdbench.results import RunRecord

METRICS = ("top1_best", "top1_last")
FORMATS = ("github", "markdown", "latex", "csv", "html")
PUBLISHED_NAME = "published_cifar100.csv"
CE_ONLY = "CE only"  # the pair of a table of CE-trained runs that no distillation run of their setting uses
CI_LEVEL = 0.95  # of the interval around every Δ
_CI_NAME = f"{CI_LEVEL * 100:g} %"
EXCLUDES_ZERO = "*"  # marks a Δ whose interval excludes zero
OTHER_CODE = "†"  # marks a row made by other code than the rest of its table
_TABLEFMT = {"github": "github", "markdown": "pipe", "latex": "latex", "html": "html"}
_RULE = {"top1_last": "last", "top1_best": "best_mean5"}  # the published report_rule each metric matches
# Published protocols that a kdbench protocol reproduces for a method (methods.md §0.3): letKD's published setting has
# no logit KD, as crd; "official" is each method's own code, whose numbers sit under their source's protocol.
_SAME_PROTOCOL = {("crd", "letkd1"): "letkd", ("crd", "letkd2"): "letkd",
                  **{("official", m): p for m, p in (("kd", "crd"), ("fitnet", "crd"), ("semckd", "semckd"),
                                                     ("takd", "takd"), ("dgkd", "takd"), ("letkd1", "letkd"),
                                                     ("letkd2", "letkd"))}}
_REQUIRED = ("run_id", "status", "role", "method", "dataset", "teacher", "student", "pair", "protocol", "recipe",
             "seed", "device", "precision", "metric", "value", "epoch")
_OPTIONAL = {"error": None, "method_options": "", "method_overrides": "", "assistants": "", "method_note": "",
             "method_label": None, "teacher_run": None, "device_name": None, "epochs": None, "batch_size": None,
             "train_subset": None, "test_subset": None, "channels_last": False, "code_fingerprint": None,
             "code_core": None, "git_sha": None, "git_dirty": None}
_PUBLISHED_COLUMNS = ("source", "teacher", "student", "method", "top1", "top1_std", "protocol", "report_rule",
                      "verified")
_RUN_METRICS = ("top1_best", "top1_last", "train_images_per_s", "peak_alloc_bytes", "peak_reserved_bytes",
                "cpu_peak_rss_bytes", "extra_params_train", "inference_params", "end_to_end_wall_s", "wall_s")
_MEMORY_KEYS = ("peak_alloc_bytes", "cpu_peak_rss_bytes")
_MEMORY_NAMES = {"peak_alloc_bytes": "CUDA max allocated", "peak_reserved_bytes": "CUDA max reserved",
                 "cpu_peak_rss_bytes": "CPU peak RSS"}
_KIND_ORDER = {"teacher": 0, "student": 1, "method": 2}
_OPTION = re.compile(r"([A-Za-z_]\w*)=(.*?)(?=,[A-Za-z_]\w*=|$)")  # "k=v,k2=v2" as written by RunRecord.tidy


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def run_summary(records: list[RunRecord], tablefmt: str = "github") -> str:
    """One line per run of a sweep: accuracy, speed, memory, wall time, or why it failed."""
    rows = []
    for record in records:
        spec, m = record.spec, record.metrics
        memory = next((m[k] for k in _MEMORY_KEYS if k in m), None)
        rows.append({
            "role": spec.role, "method": spec.method, "model": spec.pair or spec.student, "seed": spec.seed,
            "status": record.status if record.status != "failed" else f"failed: {record.error}",
            "top1 best": _fmt(m.get("top1_best")), "top1 last": _fmt(m.get("top1_last")),
            "train img/s": _fmt(m.get("train_images_per_s"), 1), "step ms": _fmt(m.get("step_ms_median"), 1),
            "peak MiB": _fmt(memory / 2**20 if memory else None, 0), "wall s": _fmt(m.get("wall_s"), 1),
        })
    return tabulate(rows, headers="keys", tablefmt=tablefmt)


# ---------------------------------------------------------------------------------------------- reading


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
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise KdbenchError(f"{path} lacks column(s) {', '.join(missing)}: it was written by an older kdbench; "
                           f"re-run the sweep with this version into a new --results-dir")
    for column, default in _OPTIONAL.items():
        if column not in table.columns:
            table[column] = default
    return table.assign(results_dir=str(root)), unreadable


def duplicate_runs(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run that :func:`load_results` found in more than one results directory."""
    return table[table["also_in"] != ""].drop_duplicates("run_id")[["run_id", "results_dir", "also_in"]]


def load_published(path: str | Path) -> pd.DataFrame:
    """The published CIFAR-100 table (methods.md §10), checked."""
    try:
        published = pd.read_csv(path)
    except Exception as error:
        raise KdbenchError(f"cannot read published table {path}: {' '.join(str(error).split())}") from None
    missing = [c for c in _PUBLISHED_COLUMNS if c not in published.columns]
    if missing:
        raise KdbenchError(f"published table {path} lacks column(s) {', '.join(missing)}")
    return published


def published_path(results_dir: str | Path, given: str | Path | None = None) -> Path | None:
    """``given``, else ``<results_dir>/published_cifar100.csv``, else the copy in this checkout's ``results/``."""
    if given is not None:
        if not Path(given).is_file():
            raise KdbenchError(f"published table {given} does not exist")
        return Path(given)
    candidates = (Path(results_dir) / PUBLISHED_NAME, Path(__file__).resolve().parents[1] / "results" / PUBLISHED_NAME)
    return next((p for p in candidates if p.is_file()), None)


_RECIPE_PARTS = (("epochs", "{} epochs"), ("batch_size", "batch {}"), ("train_subset", "{} train images"),
                 ("test_subset", "{} test images"))


def _setting_label(run: pd.Series) -> str:
    """What runs must share to be pooled: dataset, recipe (with its overrides), device and precision."""
    recipe = ", ".join(text.format(int(run[key])) for key, text in _RECIPE_PARTS if pd.notna(run[key]))
    device = run["device"] + (f" ({run['device_name']})" if pd.notna(run["device_name"]) else "")
    precision = run["precision"] + (", channels_last" if str(run["channels_last"]) == "True" else "")
    return " · ".join([run["dataset"], f"recipe {run['recipe']}" + (f" ({recipe})" if recipe else ""),
                       device, precision])


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
    wide = wide.join(level.reindex(columns=list(dict.fromkeys([*level.columns, *_RUN_METRICS]))))
    wide["memory_metric"] = wide["peak_alloc_bytes"].notna().map({True: "peak_alloc_bytes",
                                                                  False: "cpu_peak_rss_bytes"})
    wide["peak_bytes"] = wide["peak_alloc_bytes"].fillna(wide["cpu_peak_rss_bytes"])
    wide["end_to_end_s"] = wide["end_to_end_wall_s"].fillna(wide["wall_s"])  # CE runs: no teacher to add
    wide["setting"] = [_setting_label(run) for _, run in wide.iterrows()]
    return wide.reset_index()


def unfinished(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run that did not finish (failed or interrupted), with its error."""
    columns = ["run_id", "status", "role", "method", "method_label", "method_overrides", "student", "pair", "seed",
               "error"]
    return table[table["status"] != "finished"].drop_duplicates("run_id")[columns]


def _describe(bad: pd.DataFrame) -> str:
    """Runs that did not finish, one clause each: what, seed, status and error."""
    return "; ".join((r.method_label if isinstance(r.method_label, str) and r.method_label else r.method)
                     + (f"[{r.method_overrides}]" if isinstance(r.method_overrides, str) and r.method_overrides else "")
                     + f" {r.pair if isinstance(r.pair, str) else r.student} seed {r.seed}: {r.status}"
                     + (f" ({r.error})" if isinstance(r.error, str) and r.error else "") for r in bad.itertuples())


def _unfinished_line(table: pd.DataFrame) -> str:
    bad = unfinished(table)
    return f"{len(bad)} not finished: {_describe(bad)}" if len(bad) else "no runs"


# ----------------------------------------------------------------------------------------- table rows


def _tag(frame: pd.DataFrame, kind: str, protocol: str, pair: str) -> pd.DataFrame:
    arch = frame["student"]
    if kind == "method":  # what the loss contains ("fitnet (+KD)"); older tables: the method's name
        label = frame["method_label"].fillna(frame["method"])
    elif pair == CE_ONLY:
        label = kind + " " + arch + (" (CE)" if kind == "student" else "")
    else:
        label = pd.Series("student (CE)" if kind == "student" else "teacher", index=frame.index)
    return frame.assign(kind=kind, protocol=protocol, pair=pair, arch=arch, label=label)


def _check(frame: pd.DataFrame, column: str, wanted: set[str], option: str) -> pd.DataFrame:
    present = set(frame[column].dropna())
    if not wanted & present:
        raise KdbenchError(f"no finished run matches {option} {','.join(sorted(wanted))}; "
                           f"the results hold: {', '.join(sorted(present))}")
    return frame[frame[column].isin(wanted)]


def entries(table: pd.DataFrame, *, dataset: str | None = None, recipe: str | None = None,
            protocol: str | None = None, pairs: str | None = None, methods: str | None = None) -> pd.DataFrame:
    """The runs behind every leaderboard row: one row per (run, table it appears in).

    A table is one (setting, protocol, pair): the pair's distillation runs (``kind`` method), the CE-trained
    ``student`` runs of its student architecture (``kind`` student, the baseline) and the teacher runs its
    distillation runs learned from (``kind`` teacher). Teacherless runs of other methods join the tables of
    their architecture as methods. CE runs that no distillation run uses form a table of their own (pair
    ``CE only``). Filters take comma-separated values (pairs as ``T:S`` or ``T->S``); the baseline and teacher
    rows stay whatever ``methods`` says.
    """
    wide = runs(table)
    parts = []
    for _, setting in wide.groupby("setting", sort=False):
        teachers = setting[setting["role"] == "teacher"]
        students = setting[setting["role"] == "student"]
        baseline = students[students["pair"].isna() & (students["method"] == "student")]
        solo = students[students["pair"].isna() & (students["method"] != "student")]
        used: set[str] = set()
        for (proto, pair), distill in students[students["pair"].notna()].groupby(["protocol", "pair"], sort=False):
            arch_t, arch_s = distill["teacher"].iloc[0], distill["student"].iloc[0]
            taught_by = set(distill["teacher_run"].dropna())
            teacher = teachers[teachers["run_id"].isin(taught_by) if taught_by else teachers["student"] == arch_t]
            ce, others = baseline[baseline["student"] == arch_s], solo[solo["student"] == arch_s]
            used |= set(teacher["run_id"]) | set(ce["run_id"]) | set(others["run_id"])
            parts += [_tag(teacher, "teacher", proto, pair), _tag(ce, "student", proto, pair),
                      _tag(others, "method", proto, pair), _tag(distill, "method", proto, pair)]
        rest = pd.concat([teachers, baseline, solo])
        rest = rest[~rest["run_id"].isin(used)]
        parts += [_tag(rest[rest["role"] == "teacher"], "teacher", "none", CE_ONLY),
                  _tag(rest[rest["method"].eq("student") & rest["role"].eq("student")], "student", "none", CE_ONLY),
                  _tag(rest[rest["method"].ne("student")], "method", "none", CE_ONLY)]
    out = pd.concat([p for p in parts if len(p)], ignore_index=True)
    _label_variants(out)

    for column, wanted, option in (("dataset", dataset, "--dataset"), ("recipe", recipe, "--recipe"),
                                   ("protocol", protocol, "--protocol")):
        if wanted:
            out = _check(out, column, set(_split(wanted)), option)
    if pairs:
        out = _check(out, "pair", {p.replace(":", "->") for p in _split(pairs)}, "--pairs")
    if methods:
        wanted = set(_split(methods))
        _check(out[out["kind"] != "teacher"], "method", wanted, "--methods")
        keep = (out["kind"] != "method") | out["method"].isin(wanted)
        hit = (out["method"].isin(wanted) & (out["kind"] != "teacher")).groupby(
            [out["setting"], out["protocol"], out["pair"]]).transform("any")
        out = out[keep & hit]
    return out.reset_index(drop=True)


def _label_variants(out: pd.DataFrame) -> None:
    """Label a method's rows, after what their loss contains, by the options that differ from its defaults or
    between its option sets in one table (``semckd[beta=50.0]``, ``fitnet (+KD)[hint_layer=1]``), and by the TA
    chain where chains differ."""
    for _, rows in out[out["kind"] == "method"].groupby(["setting", "protocol", "pair", "method"], sort=False):
        options = rows["method_options"].fillna("").map(lambda text: dict(_OPTION.findall(text)))
        changed = set().union(*rows["method_overrides"].fillna("").map(lambda text: dict(_OPTION.findall(text))))
        chains = rows["assistants"].fillna("")
        shown = sorted(changed | {key for key in set().union(*options)
                                  if options.map(lambda o, key=key: o.get(key)).nunique(dropna=False) > 1})
        if not shown and chains.nunique() < 2:
            continue
        for index, base in rows["label"].items():
            label = base + ("[" + ",".join(f"{k}={options[index].get(k, '')}" for k in shown) + "]"
                            if shown else "")
            out.at[index, "label"] = label + (f" via {chains[index]}" if chains.nunique() > 1 and chains[index] else "")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def groups(frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(title, rows) per setting and protocol: the unit that plots and the ``--by setting`` tables cover."""
    for (setting, protocol), group in frame.groupby(["setting", "protocol"], sort=False):
        yield (f"{setting} · protocol {protocol}" if protocol != "none" else f"{setting} · CE only"), group


# ---------------------------------------------------------------------------------------------- leaderboard


def _by_seed(frame: pd.DataFrame, metric: str) -> pd.Series:
    return frame.groupby("seed")[metric].mean().dropna()


def _differences(rows: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> tuple[pd.Series, bool]:
    """``metric`` of ``rows`` minus the baseline's per seed, over the seeds both ran (paired: True); with no seed
    in common, the difference of their means as one value (paired: False). Empty when either has no value."""
    ours, base = _by_seed(rows, metric), _by_seed(baseline, metric)
    common = ours.index.intersection(base.index)
    if len(common) or ours.empty or base.empty:
        return ours[common] - base[common], True
    return pd.Series([ours.mean() - base.mean()]), False


def _interval(values: pd.Series) -> tuple[float, float]:
    """The CI_LEVEL confidence interval of the mean of ``values`` (t distribution, n − 1 degrees of freedom);
    NaN below two values. Paired differences make seed-to-seed noise that both runs share cancel out."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return values.mean() - half, values.mean() + half


def _delta(rows: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> dict[str, Any]:
    """Δ over the baseline with its interval: paired by seed over the common seeds, else a difference of means
    (no interval)."""
    diff, paired = _differences(rows, baseline, metric)
    if diff.empty:
        return {}
    low, high = _interval(diff) if paired else (math.nan, math.nan)
    return {"delta": diff.mean(), "delta_std": diff.std(ddof=1), "delta_n": len(diff) if paired else 0,
            "delta_paired": paired, "delta_ci_low": low, "delta_ci_high": high,
            "delta_excludes_zero": bool(low > 0 or high < 0)}


def _core(table: pd.DataFrame) -> str | None:
    """The most common ``code_core`` of a table's runs (None when none recorded one: an older table)."""
    counts = table["code_core"].value_counts()
    return counts.index[0] if len(counts) else None


def _commits(rows: pd.DataFrame) -> str:
    """The git commits (short) that made ``rows``' runs, ``+dirty`` with uncommitted changes."""
    shas = rows["git_sha"].fillna("unknown").astype(str).str[:7] + rows["git_dirty"].eq(True).map(
        {True: "+dirty", False: ""})
    return ", ".join(dict.fromkeys(shas))


def _published(published: pd.DataFrame, teacher: str | None, student: str, method: str, protocol: str,
               metric: str) -> dict[str, str]:
    """Published values (joined with " / ") and sources for one row; other reporting rules are marked."""
    match = (published["method"] == method) & (published["student"] == student)
    if teacher is not None:
        match &= published["teacher"] == teacher
    if protocol != "none":  # CE-only tables: CE training is the same under every protocol
        match &= published["protocol"].isin({protocol, _SAME_PROTOCOL.get((protocol, method), protocol)})
    values, sources = [], []
    keys = ["top1", "top1_std", "report_rule", "verified", "protocol"]
    for (top1, std, rule, verified, proto), rows in published[match].groupby(keys, dropna=False, sort=False):
        values.append(f"{top1:.2f}" + (f" ± {std:.2f}" if pd.notna(std) else "")
                      + ("" if rule == _RULE[metric] else f" [{rule}]"))
        sources.append("; ".join(dict.fromkeys(rows["source"])) + ("" if verified == "primary" else f" ({verified})")
                       + ("" if proto == protocol else f" (protocol {proto})"))
    return {"published": " / ".join(values), "published_source": " / ".join(sources)}


def leaderboard(frame: pd.DataFrame, metric: str = "top1_best", published: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (table, row) of :func:`entries`: ``n``, mean and sample std of ``metric`` over seeds, Δ over
    the baseline with its interval, mean costs, whether the row was made by other code than the rest of its
    table (``other_code``) and by which ``commits``, and (dataset cifar100, ``published`` given) the published
    numbers side by side."""
    if metric not in METRICS:
        raise KdbenchError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if frame[metric].isna().all():
        raise KdbenchError(f"no finished run recorded {metric}")
    rows = []
    for (setting, protocol, pair), table in frame.groupby(["setting", "protocol", "pair"], sort=False):
        baseline, core = table[table["kind"] == "student"], _core(table)
        for (kind, arch, label), g in table.groupby(["kind", "arch", "label"], sort=False):
            first, values = g.iloc[0], g[metric].dropna()
            row = {"setting": setting, "protocol": protocol, "pair": pair, "kind": kind, "label": label, "arch": arch,
                   "method": first["method"], "method_options": first["method_options"],
                   "method_note": first["method_note"], "dataset": first["dataset"], "recipe": first["recipe"],
                   "device": first["device"], "precision": first["precision"], "metric": metric,
                   "n": len(values), "mean": values.mean(), "std": values.std(ddof=1),
                   "seeds": ",".join(str(s) for s in sorted(g["seed"].unique())),
                   "delta": math.nan, "delta_std": math.nan, "delta_n": 0, "delta_paired": False,
                   "delta_ci_low": math.nan, "delta_ci_high": math.nan, "delta_excludes_zero": False,
                   "train_images_per_s": g["train_images_per_s"].mean(), "peak_bytes": g["peak_bytes"].mean(),
                   "memory_metric": first["memory_metric"], "extra_params_train": g["extra_params_train"].mean(),
                   "inference_params": g["inference_params"].mean(), "end_to_end_s": g["end_to_end_s"].mean(),
                   # made by other code: shared code unlike most of the table's runs, or seeds run by different code
                   "other_code": core is not None and bool(g["code_core"].ne(core).any()
                                                           or g["code_fingerprint"].nunique(dropna=False) > 1),
                   "commits": _commits(g)}
            if kind == "method":
                row.update(_delta(g, baseline[baseline["arch"] == arch], metric))
            if published is not None:
                row.update(_published_row(published, pair, kind, arch, first, protocol, metric))
            rows.append(row)
    board = pd.DataFrame(rows)
    board["_order"] = board["kind"].map(_KIND_ORDER)
    board["_rank"] = -board["mean"].where(board["kind"] == "method", math.inf)
    order = ["setting", "protocol", "pair"]
    board["_table"] = board.groupby(order, sort=False).ngroup()
    return board.sort_values(["_table", "_order", "_rank", "label"]).drop(columns=["_order", "_rank", "_table"]) \
        .reset_index(drop=True)


def _published_row(published: pd.DataFrame, pair: str, kind: str, arch: str, run: pd.Series, protocol: str,
                   metric: str) -> dict[str, str]:
    """The published cells of a leaderboard row: empty outside CIFAR-100 and for CE-only extra methods."""
    if run["dataset"] != "cifar100" or (pair == CE_ONLY and kind == "method"):
        return {"published": "", "published_source": ""}
    if pair != CE_ONLY:
        teacher, student = pair.split("->")
        return _published(published, teacher, student, kind if kind != "method" else run["method"], protocol, metric)
    if kind == "student":
        return _published(published, None, arch, "student", protocol, metric)
    # a teacher without a pair: its published teacher rows, whichever student they were quoted with
    rows = published[(published["method"] == "teacher") & (published["teacher"] == arch)]
    return _published(rows.assign(student=arch), None, arch, "teacher", protocol, metric)


# ---------------------------------------------------------------------------------------------- rendering


def _count(value: float) -> str:
    if pd.isna(value):
        return ""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    if pd.isna(seconds):
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.2f} h"


def _mean_std(mean: float, std: float, signed: bool = False) -> str:
    if pd.isna(mean):
        return ""
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if pd.notna(std) else "")


def _text(text: str, fmt: str, heading: bool = False) -> str:
    if fmt == "html":
        return f"<h3>{html.escape(text)}</h3>" if heading else f"<p>{html.escape(text)}</p>"
    if fmt == "latex":
        return "% " + text
    return f"### {text}" if heading else text


def _rule_text(metric: str) -> str:
    epoch = "the best epoch" if metric == "top1_best" else "the last epoch"
    return (f"Top-1 = {metric} ({epoch} of each run), mean ± sample std (ddof = 1) over the n seeds of finished "
            f"runs. Δ vs student = difference to the CE-trained student of the same setting, paired by seed: mean "
            f"± sample std of the per-seed differences, and their {_CI_NAME} confidence interval (t distribution, "
            f"n − 1 degrees of freedom, over the seeds both ran; n/a below two), marked {EXCLUDES_ZERO} when it "
            f"excludes zero. "
            f"Runs of different datasets, recipes, protocols, devices or precisions are never pooled: one table "
            f"each. Published numbers are marked [rule] when their reporting rule is not {_RULE[metric]}.")


def _table(board: pd.DataFrame, metric: str, with_pair: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Display rows and footnotes of one table."""
    notes = [n for n in dict.fromkeys(board["method_note"].fillna("")) if n]
    memory = board["memory_metric"].dropna()
    memory_header = "peak alloc MiB" if len(memory) and memory.iloc[0] == "peak_alloc_bytes" else "peak RSS MiB"
    show_published = "published" in board.columns and (board["dataset"] == "cifar100").all()
    rows, unpaired, distilled, other_code = [], False, (board["kind"] == "method").any(), []
    for r in board.itertuples():
        name = r.label if r.kind == "method" else f"{r.kind} {r.arch}" + (" (CE)" if r.kind == "student" else "")
        if r.other_code:
            other_code.append(f"{name} {r.commits}")
            name += f" {OTHER_CODE}"
        if isinstance(r.method_note, str) and r.method_note:
            name += f" [{notes.index(r.method_note) + 1}]"
        delta = _mean_std(r.delta, r.delta_std, signed=True)
        ci = "" if not delta else "n/a" if pd.isna(r.delta_ci_low) else \
            f"[{r.delta_ci_low:+.2f}, {r.delta_ci_high:+.2f}]" + (f" {EXCLUDES_ZERO}" if r.delta_excludes_zero else "")
        if r.kind == "method" and delta and not r.delta_paired:
            delta, unpaired = delta + " (unpaired)", True
        elif r.kind == "method" and delta and r.delta_n < r.n:
            delta += f" ({r.delta_n} paired)"
        row = {"pair": r.pair} if with_pair else {}
        row.update({"model": name, "n": str(r.n), f"{metric} %": _mean_std(r.mean, r.std)})
        row.update({"Δ vs student": delta, f"Δ {_CI_NAME} CI": ci} if distilled else {})
        row.update({"train img/s": _fmt(r.train_images_per_s, 1),
                    memory_header: _fmt(r.peak_bytes / 2**20 if pd.notna(r.peak_bytes) else None, 0),
                    "extra train params": _count(r.extra_params_train), "inference params": _count(r.inference_params),
                    "end-to-end": _duration(r.end_to_end_s)})
        if show_published:
            row.update({"published %": r.published, "published source": r.published_source})
        rows.append(row)
    footnotes = [f"[{i}] {', '.join(board.loc[board['method_note'] == n, 'label'])}: {n}"
                 for i, n in enumerate(notes, 1)]
    memory_name = _MEMORY_NAMES[memory.iloc[0]] if len(memory) else "not measured"
    footnotes.append(f"end-to-end: wall time of the run plus its teacher's and teacher assistants' training and "
                     f"fitting (end_to_end_wall_s); {memory_header}: {memory_name}.")
    if unpaired:
        footnotes.append("(unpaired): no seed in common with the baseline; Δ is a difference of means.")
    if other_code:
        rest = dict.fromkeys(c for text in board.loc[~board["other_code"], "commits"] for c in text.split(", "))
        footnotes.append(f"{OTHER_CODE} made by other code than the rest of the table: its runs' shared harness, "
                         f"data and models code (code_core) is not the table's most common, or its seeds ran "
                         f"different code (code_fingerprint). Commits: {'; '.join(other_code)}"
                         + (f"; the other rows {', '.join(rest)}." if rest else "."))
    if not (board["dataset"] == "cifar100").all():
        datasets = ", ".join(sorted(set(board["dataset"])))
        footnotes.append(f"No published column: the published numbers are CIFAR-100 results (this table: {datasets}).")
    elif not show_published:
        footnotes.append(f"No published column: no published table ({PUBLISHED_NAME}) was found.")
    return rows, footnotes


def render_report(board: pd.DataFrame, fmt: str = "github", by: str = "pair",
                  not_finished: pd.DataFrame | None = None, duplicates: pd.DataFrame | None = None,
                  unreadable: list[str] | None = None) -> str:
    """The leaderboard as text: one table per pair (``by="pair"``) or per setting and protocol
    (``by="setting"``), each under a heading naming what it holds, with footnotes, then the runs not counted
    (:func:`unfinished`) and those counted once (:func:`duplicate_runs`); CSV: the numbers."""
    if fmt not in FORMATS:
        raise KdbenchError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if by not in ("pair", "setting"):
        raise KdbenchError(f"unknown grouping {by!r}; valid groupings: pair, setting")
    if fmt == "csv":
        return board.to_csv(index=False)
    metric = board["metric"].iloc[0]
    blocks = [_text(_rule_text(metric), fmt)]
    for title, table in groups(board):
        if by == "pair":
            parts = [(f"{pair} · {title}" if pair != CE_ONLY else title, t)
                     for pair, t in table.groupby("pair", sort=False)]
        else:
            parts = [(title, table)]
        for heading, t in parts:
            rows, footnotes = _table(t, metric, with_pair=by == "setting")
            align = ["left" if k in ("pair", "model", "published source") else "right" for k in rows[0]]
            blocks += [_text(heading, fmt, heading=True),
                       tabulate(rows, headers="keys", tablefmt=_TABLEFMT[fmt], disable_numparse=True, colalign=align),
                       *(_text(n, fmt) for n in footnotes)]
    if not_finished is not None and len(not_finished):
        runs_ = f"{len(not_finished)} run{'s' if len(not_finished) > 1 else ''}"
        blocks.append(_text(f"Not counted ({runs_} did not finish): {_describe(not_finished)}", fmt))
    if unreadable:
        runs_ = f"{len(unreadable)} run folder{'s' if len(unreadable) > 1 else ''}"
        blocks.append(_text(f"Not counted ({runs_} could not be read; `kdbench run` sets such files aside and "
                            f"makes the runs again): {'; '.join(unreadable)}", fmt))
    if duplicates is not None and len(duplicates):
        runs_ = f"{len(duplicates)} run{'s' if len(duplicates) > 1 else ''}"
        blocks.append(_text(f"Counted once ({runs_} in more than one results directory, read from the first): "
                            + "; ".join(f"{r.run_id} ({r.results_dir}; also in {r.also_in})"
                                        for r in duplicates.itertuples()), fmt))
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------------------- paired comparison


def paired_comparison(frame: pd.DataFrame, a: str, b: str = "student",
                      metric: str = "top1_best") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-seed differences ``a - b`` of ``metric`` within one table of :func:`entries` (filter it first when
    both appear in several), and their summary: n, mean, sample std and a paired t-test (n ≥ 2).
    ``a`` and ``b`` are labels (``kd``, ``student (CE)``) or method names (``student`` is the baseline)."""
    def rows(name: str) -> pd.DataFrame:
        picked = frame[(frame["kind"] != "teacher") & ((frame["label"] == name) | (frame["method"] == name))]
        if picked.empty:
            raise KdbenchError(f"no finished run of {name!r}; the results hold: "
                               f"{', '.join(sorted(set(frame.loc[frame['kind'] != 'teacher', 'label'])))}")
        return picked

    keys = ["setting", "protocol", "pair"]
    common = rows(a)[keys].drop_duplicates().merge(rows(b)[keys].drop_duplicates())
    left, right = rows(a).merge(common), rows(b).merge(common)
    if len(common) != 1 or left["label"].nunique() > 1 or right["label"].nunique() > 1:
        raise KdbenchError(f"{a!r} and {b!r} appear together in {len(common)} tables; filter the entries to one "
                           f"(dataset, recipe, protocol, pair) and one option set first")
    key = common.iloc[0].to_dict()
    per_seed = pd.concat({a: _by_seed(left, metric), b: _by_seed(right, metric)}, axis=1).dropna()
    per_seed["difference"] = per_seed[a] - per_seed[b]
    diff = per_seed["difference"]
    summary = {**key, "metric": metric, "n": len(diff), "mean": diff.mean(), "std": diff.std(ddof=1),
               "t": math.nan, "p": math.nan}
    if len(diff) >= 2:
        from scipy import stats

        test = stats.ttest_rel(per_seed[a], per_seed[b])
        summary.update(t=float(test.statistic), p=float(test.pvalue))
    return per_seed.rename_axis("seed").reset_index(), summary


# ---------------------------------------------------------------------------------------------------- plots
# Each plot_* takes one group of entries (see `groups`: one setting and protocol) and returns a Figure with a
# panel per pair; `setting` (the group's title) goes under the headline, so a saved file says what it shows.


def _palette(group: pd.DataFrame) -> dict[str, Any]:
    """One colour per row label, teacher and baseline first, the same in every plot of a group."""
    import seaborn as sns

    labels = list(dict.fromkeys(group.sort_values("kind", key=lambda k: k.map(_KIND_ORDER), kind="stable")["label"]))
    return dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))))


def _figure(pairs: list[str], headline: str, setting: str, height: float, width: float = 5.5):
    import matplotlib.pyplot as plt

    cols = min(3, len(pairs))
    fig, axes = plt.subplots(math.ceil(len(pairs) / cols), cols, figsize=(width * cols, height * math.ceil(
        len(pairs) / cols) + 0.6), squeeze=False, layout="constrained")
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    _suptitle(fig, headline, setting)
    return fig, list(axes.flat)


def _suptitle(fig, headline: str, setting: str) -> None:
    """The headline, then the setting broken between its " · " parts to fit the figure's width."""
    chars = int(fig.get_figwidth() * 14)  # about 14 characters of 10-point text per inch
    lines = [textwrap.fill(headline, chars)]
    for part in setting.split(" · ") if setting else []:
        if len(lines) > 1 and len(lines[-1]) + 3 + len(part) <= chars:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    fig.suptitle("\n".join(lines), fontsize=10)


def _legend(fig, palette: dict[str, Any], line: bool = False) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=None if line else "o", linestyle="-" if line else "", label=lbl)
               for lbl, c in palette.items()]
    fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=9)


def plot_accuracy_vs_throughput(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Mean top-1 against training throughput (log x) per pair, error bars = sd over seeds; the Pareto front
    (nothing both faster and more accurate) is circled and joined by a dashed line."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    students = group[group["kind"] != "teacher"]
    palette = {k: v for k, v in _palette(group).items() if k in set(students["label"])}
    pairs = list(dict.fromkeys(students["pair"]))
    with sns.axes_style("whitegrid"):
        fig, axes = _figure(pairs, f"{metric} vs training throughput (Pareto front circled; error bars: sd over "
                                   f"seeds)", setting, 4.2)
        for ax, pair in zip(axes, pairs):
            stats = students[students["pair"] == pair].groupby("label").agg(
                x=("train_images_per_s", "mean"), xerr=("train_images_per_s", "std"),
                y=(metric, "mean"), yerr=(metric, "std")).dropna(subset=["x", "y"])
            for label, s in stats.iterrows():
                ax.errorbar(s.x, s.y, xerr=None if pd.isna(s.xerr) else s.xerr,
                            yerr=None if pd.isna(s.yerr) else s.yerr, fmt="o", color=palette[label], capsize=3)
            front, best = [], -math.inf
            for _, s in stats.sort_values("x", ascending=False).iterrows():
                if s.y > best:
                    front, best = front + [(s.x, s.y)], s.y
            if front:
                ax.plot(*zip(*sorted(front)), "--", color="0.35", linewidth=1, marker="o", markersize=15,
                        markerfacecolor="none", zorder=0)
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set(title=pair, xlabel="training throughput (img/s, log scale)", ylabel=f"{metric} (%)")
        _legend(fig, palette)
    plt.close(fig)
    return fig


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (800, 2k, not 10³), minor ones only where they do not crowd."""
    from matplotlib.ticker import FuncFormatter

    def plain(value: float, _=None) -> str:
        return f"{value / 1000:g}k" if value >= 1000 else f"{value:g}"

    def minor(value: float, _=None) -> str:
        low, high = sorted(axis.get_view_interval())  # read at draw time, after autoscaling
        decades = math.log10(high / low) if low > 0 else 3
        shown = range(1, 10) if decades < 0.4 else (2, 3, 5) if decades < 1 else (2, 5) if decades < 2 else ()
        return plain(value) if round(value / 10 ** math.floor(math.log10(value))) in shown else ""

    axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_formatter(FuncFormatter(minor))


def _horizontal(plot, group: pd.DataFrame, x: str, xlabel: str, headline: str, setting: str,
                hue: str | None = None, colours: dict[str, Any] | None = None,
                palette: dict[str, Any] | None = None, legend: bool = False, **kwargs):
    """One horizontal seaborn plot per pair, row labels on the y axis (long names stay readable). Colours:
    ``palette`` per row label, or ``colours`` per value of ``hue`` when another column is the hue (its
    ``legend`` goes right of the panels)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    pairs, palette = list(dict.fromkeys(group["pair"])), palette or _palette(group)
    height = 1.2 + 0.45 * max(group.groupby("pair")["label"].nunique())
    with sns.axes_style("whitegrid"):
        fig, axes = _figure(pairs, headline, setting, height)
        for ax, pair in zip(axes, pairs):
            data = group[group["pair"] == pair]
            options = {"hue": "label", "palette": palette} if hue is None else {"hue": hue, "palette": colours}
            plot(data=data, x=x, y="label", order=[lbl for lbl in palette if lbl in set(data["label"])], ax=ax,
                 legend=legend and ax is axes[0], **options, **kwargs)
            ax.set(title=pair, xlabel=xlabel, ylabel="")
        if legend:
            handles, labels = axes[0].get_legend_handles_labels()
            axes[0].get_legend().remove()
            fig.legend(handles, labels, loc="outside right center", frameon=False, fontsize=9)
    plt.close(fig)
    return fig, axes


def plot_top1(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Top-1 per method and pair: mean with error bars = sd over seeds (their spread; the uncertainty of a
    comparison is the Δ plot's interval); the teacher as a dashed line."""
    import seaborn as sns

    students = group[group["kind"] != "teacher"]
    fig, axes = _horizontal(sns.pointplot, students, metric, f"{metric} (%): mean, error bars ± sd over seeds",
                            f"{metric} per method", setting, palette=_palette(group), errorbar="sd",
                            linestyle="none", capsize=0.3)
    for ax, pair in zip(axes, dict.fromkeys(students["pair"])):
        teacher = group[(group["pair"] == pair) & (group["kind"] == "teacher")][metric].mean()
        if pd.notna(teacher):
            ax.axvline(teacher, color="0.3", linestyle="--", linewidth=1)
            ax.annotate(f"teacher {teacher:.1f}", (teacher, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(-3, -3), textcoords="offset points", ha="right", va="top", fontsize=8)
    return fig


def _seed_deltas(group: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The differences behind each leaderboard Δ (see :func:`_differences`), one row each."""
    parts = []
    for pair, table in group.groupby("pair", sort=False):
        baseline = table[table["kind"] == "student"]
        for (arch, label), rows in table[table["kind"] == "method"].groupby(["arch", "label"], sort=False):
            diff, _ = _differences(rows, baseline[baseline["arch"] == arch], metric)
            parts.append(pd.DataFrame({"pair": pair, "kind": "method", "label": label, "delta": diff.to_numpy()}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_delta(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Δ top-1 over the CE student per method and pair, paired by seed: diverging bars (green better, red
    worse), error bars = the leaderboard's confidence interval. None when no pair has a baseline."""
    import seaborn as sns

    deltas = _seed_deltas(group, metric)
    if deltas.empty:
        return None
    better = deltas.groupby(["pair", "label"])["delta"].transform("mean") >= 0
    deltas["direction"] = better.map({True: "better", False: "worse"})
    fig, axes = _horizontal(sns.barplot, deltas, "delta",
                            f"Δ {metric} vs student (points): mean, error bars {_CI_NAME} CI of the paired Δ",
                            f"Δ {metric} over the CE-trained student", setting, hue="direction",
                            colours={"better": "#2a9d8f", "worse": "#e76f51"}, errorbar=_interval, capsize=0.2)
    for ax in axes:
        ax.axvline(0, color="0.2", linewidth=1)
    return fig


def plot_memory(group: pd.DataFrame, setting: str = ""):
    """Peak memory per method and pair (CUDA max allocated and reserved, or CPU peak RSS), sd over seeds."""
    import seaborn as sns

    present = [k for k in ("peak_alloc_bytes", "peak_reserved_bytes", "cpu_peak_rss_bytes")
               if k in group.columns and group[k].notna().any()]
    data = group.melt(id_vars=["pair", "label", "kind", "seed"], value_vars=present, var_name="measure",
                      value_name="bytes").dropna(subset=["bytes"])
    data["MiB"] = data["bytes"] / 2**20
    data["measure"] = data["measure"].map(_MEMORY_NAMES)
    xlabel = "peak memory" if len(present) > 1 else data["measure"].iloc[0]
    fig, _ = _horizontal(sns.barplot, data, "MiB", f"{xlabel} (MiB), mean ± sd over seeds",
                            "peak memory per method", setting, hue="measure" if len(present) > 1 else None,
                            legend=len(present) > 1, errorbar="sd", capsize=0.2)
    return fig


def plot_learning_curves(group: pd.DataFrame, table: pd.DataFrame, setting: str = ""):
    """Test top-1 by epoch per method and pair, band = sd over seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    curves = table[(table["metric"] == "top1") & table["epoch"].notna()][["run_id", "epoch", "value"]]
    data = group[["run_id", "pair", "label", "kind"]].merge(curves, on="run_id").astype({"epoch": int})
    palette, pairs = _palette(group), list(dict.fromkeys(data["pair"]))
    with sns.axes_style("whitegrid"):
        fig, axes = _figure(pairs, "test top-1 by epoch (band: sd over seeds)", setting, 4.0)
        for ax, pair in zip(axes, pairs):
            sns.lineplot(data=data[data["pair"] == pair], x="epoch", y="value", hue="label", palette=palette,
                         errorbar="sd", err_kws={"alpha": 0.12}, linewidth=1.3, ax=ax, legend=False,
                         marker="o" if data["epoch"].max() <= 20 else None, markersize=4)
            ax.set(title=pair, xlabel="epoch", ylabel="test top-1 (%)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        _legend(fig, {lbl: c for lbl, c in palette.items() if lbl in set(data["label"])}, line=True)
    plt.close(fig)
    return fig


def plot_heatmap(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Mean top-1 per method (rows) and pair (columns), annotated: the paper-table view. The colour scale
    spans the students, so a far better teacher does not flatten their differences (its cells saturate)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = group.pivot_table(index="label", columns="pair", values=metric, aggfunc="mean", sort=False)
    grid = grid.reindex([lbl for lbl in _palette(group) if lbl in grid.index])
    fig, ax = plt.subplots(figsize=(max(6.0, 3.0 + 1.6 * grid.shape[1]), 2.4 + 0.5 * grid.shape[0]),
                           layout="constrained")
    students = grid.drop(index=[lbl for lbl in grid.index if lbl.startswith("teacher")])
    scale = students if students.notna().any().any() else grid  # the teacher saturates the scale's top
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", linewidths=0.5, ax=ax, vmin=scale.min().min(),
                vmax=scale.max().max(), cbar_kws={"label": f"mean {metric} (%)"})
    ax.set(xlabel="", ylabel="")
    ax.tick_params(axis="y", labelrotation=0)
    ax.tick_params(axis="x", labelrotation=20 if grid.shape[1] > 3 else 0)
    _suptitle(fig, f"mean {metric} per method and pair", setting)
    plt.close(fig)
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:100]


def save_plots(frame: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path, metric: str = "top1_best") -> list[Path]:
    """Every plot, as PNG and SVG, into ``out_dir/<setting-and-protocol>/``; returns the files written."""
    out_dir, written = Path(out_dir), []
    for title, group in groups(frame):
        folder = out_dir / _slug(title)
        folder.mkdir(parents=True, exist_ok=True)
        figures = {"accuracy_vs_throughput": plot_accuracy_vs_throughput(group, metric, title),
                   "top1": plot_top1(group, metric, title), "delta": plot_delta(group, metric, title),
                   "memory": plot_memory(group, title), "learning_curves": plot_learning_curves(group, table, title),
                   "heatmap": plot_heatmap(group, metric, title)}
        for name, fig in figures.items():
            for suffix in (".png", ".svg"):
                if fig is not None:
                    fig.savefig(folder / f"{name}{suffix}", dpi=150)
                    written.append(folder / f"{name}{suffix}")
    return written


# ---------------------------------------------------------------------------------------------- the command


def report(results_dirs: str | Path | Iterable[str | Path], fmt: str = "github", metric: str = "top1_best",
           by: str = "pair", published: str | Path | None = None, plots: str | Path | None = None,
           **filters: str | None) -> tuple[str, list[Path]]:
    """``kdbench report``: the leaderboard text and the plot files written (when ``plots`` names a folder). The
    published table is looked for in the first results directory."""
    table = load_results(results_dirs)
    frame = entries(table, **filters)
    path = published_path(table["results_dir"].iloc[0], published)
    board = leaderboard(frame, metric, load_published(path) if path else None)
    text = render_report(board, fmt, by, unfinished(table), duplicate_runs(table), table.attrs.get("unreadable"))
    return text, save_plots(frame, table, plots, metric) if plots else []
