"""Aggregation: finished runs → the rows of every leaderboard table, with their statistics.

Rules (kdbench's, kept here because they decide every number shown): finished runs only; mean ± sample std
(ddof = 1) with n over seeds, as DKD reports CIFAR-100 (Zhao et al., CVPR 2022: mean of 5 runs,
megvii-research/mdistiller issue #30); Δ against the CE-trained student of the same setting, paired by seed, with a
95 % t interval, because absolute numbers drift with hardware and software (megvii-research/mdistiller issues #7,
#66), with a paired t-test p per row adjusted over the methods of its table (Holm 1979 by default, or
Benjamini–Hochberg 1995), because a table of many methods against one baseline otherwise marks some by chance; runs of
different datasets, recipes, protocols, device types or precisions are never pooled, nor runs taught by different
teachers (unless their runs record one ``teacher_pool``, a column no kdbench sweep writes yet).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

import numpy as np
import pandas as pd

from kdbench.errors import KdbenchError
from kdbench.report.formats import number
from kdbench.report.load import device_names, runs
from kdbench.report.published import published_cells

METRICS = ("top1_at_best_val", "top1_best", "top1_last")
# What each metric selects, as the report states it: only top1_at_best_val picks its epoch without the test set.
METRIC_RULES = {"top1_at_best_val": "test top-1 at the epoch of best validation top-1",
                "top1_best": "selected on test (best test epoch, as CRD and DKD report)",
                "top1_last": "the last epoch"}
CORRECTIONS = {"holm": "Holm", "bh": "Benjamini–Hochberg", "none": "unadjusted"}  # --correction: its name in text
SIGNIFICANCE = 0.05  # an adjusted p below it earns the *
CE_ONLY = "CE only"  # the pair of a table of CE-trained runs that no distillation run of their setting uses
CI_LEVEL = 0.95  # of the interval around every Δ
CI_NAME = f"{CI_LEVEL * 100:g} %"
KIND_ORDER = {"teacher": 0, "student": 1, "method": 2}
_OPTION = re.compile(r"([A-Za-z_]\w*)=(.*?)(?=,[A-Za-z_]\w*=|$)")  # "k=v,k2=v2" as written by RunRecord.tidy


def _tag(frame: pd.DataFrame, kind: str, protocol: str, pair: str, setting: str) -> pd.DataFrame:
    """``frame``'s runs as rows of the table (setting, protocol, pair); ``trained_in`` keeps the setting of a
    teacher trained under its own recipe."""
    arch = frame["student"]
    if kind == "method":  # what the loss contains ("fitnet (+KD)"); older tables: the method's name
        label = frame["method_label"].fillna(frame["method"])
    elif pair == CE_ONLY:
        label = kind + " " + arch + (" (CE)" if kind == "student" else "")
    else:
        label = pd.Series("student (CE)" if kind == "student" else "teacher", index=frame.index)
    trained_in = frame["setting"].where(frame["setting"] != setting)
    return frame.assign(kind=kind, protocol=protocol, pair=pair, arch=arch, label=label, setting=setting,
                        trained_in=trained_in)


def _check(frame: pd.DataFrame, column: str, wanted: set[str], option: str) -> pd.DataFrame:
    """The tables (setting, protocol, pair) whose own runs match: a teacher trained under its own recipe stays in the
    tables of its students."""
    present = set(frame[column].dropna())
    if not wanted & present:
        raise KdbenchError(f"no finished run matches {option} {','.join(sorted(wanted))}; "
                           f"the results hold: {', '.join(sorted(present))}")
    own = frame[frame["trained_in"].isna()]
    tables = own.loc[own[column].isin(wanted), ["setting", "protocol", "pair"]].drop_duplicates()
    return frame.merge(tables, on=["setting", "protocol", "pair"])


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
    all_teachers = wide[wide["role"] == "teacher"]  # a teacher may have its own recipe, hence its own setting
    parts, used = [], set()
    for name, setting in wide.groupby("setting", sort=False):
        students = setting[setting["role"] == "student"]
        baseline = students[students["pair"].isna() & (students["method"] == "student")]
        solo = students[students["pair"].isna() & (students["method"] != "student")]
        for (proto, pair), distill in students[students["pair"].notna()].groupby(["protocol", "pair"], sort=False):
            arch_t, arch_s = distill["teacher"].iloc[0], distill["student"].iloc[0]
            taught_by = set(distill["teacher_run"].dropna())
            teacher = all_teachers[all_teachers["run_id"].isin(taught_by) if taught_by
                                   else (all_teachers["student"] == arch_t) & (all_teachers["setting"] == name)]
            ce, others = baseline[baseline["student"] == arch_s], solo[solo["student"] == arch_s]
            used |= set(teacher["run_id"]) | set(ce["run_id"]) | set(others["run_id"])
            parts += [_tag(teacher, "teacher", proto, pair, name), _tag(ce, "student", proto, pair, name),
                      _tag(others, "method", proto, pair, name), _tag(distill, "method", proto, pair, name)]
    untaught = wide["role"].eq("teacher") | wide["role"].eq("student") & wide["pair"].isna()
    rest = wide[untaught & ~wide["run_id"].isin(used)]
    for name, setting in rest.groupby("setting", sort=False):
        ce = setting["method"].eq("student")
        parts += [_tag(setting[setting["role"] == "teacher"], "teacher", "none", CE_ONLY, name),
                  _tag(setting[ce & setting["role"].eq("student")], "student", "none", CE_ONLY, name),
                  _tag(setting[~ce], "method", "none", CE_ONLY, name)]
    out = pd.concat([p for p in parts if len(p)], ignore_index=True)
    _label_variants(out)
    _label_teachers(out)
    out = shown_costs(out)

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


def shown_costs(out: pd.DataFrame) -> pd.DataFrame:
    """Throughput and end-to-end cost as a table row shows them: from one sitting (``kdbench costs``) where that
    sitting priced every run of the row and the teachers and assistants they learned from (``cost_sitting`` names
    it), else the runs' own timings for the whole row (``cost_sitting`` None), never a mix of both."""
    rows = out.groupby(["setting", "protocol", "pair", "kind", "arch", "label"], sort=False, dropna=False)
    whole = rows["sitting_end_to_end_s"].transform(lambda s: s.notna().all()) & rows["cost_sitting_id"].transform(
        "nunique").eq(1)
    return out.assign(train_images_per_s=out["sitting_train_images_per_s"].where(whole, out["train_images_per_s"]),
                      end_to_end_s=out["sitting_end_to_end_s"].where(whole, out["end_to_end_s"]),
                      cost_sitting=out["cost_sitting"].where(whole, None))


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


def teacher_text(rows: pd.DataFrame) -> str:
    """The teacher seeds of taught runs: the pool a sweep chose (``--teacher-seeds``), else each seed (a run id where
    the teacher run is not in the results)."""
    pools = rows["teacher_pool"].dropna()
    seeds = sorted(rows.loc[rows["teacher_pool"].isna(), "teacher_seed"].dropna().astype(int).unique())
    parts = [f"teacher seeds {pool} (pooled)" for pool in dict.fromkeys(pools)]
    parts += [f"teacher seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"] if seeds else []
    unknown = rows.loc[rows["teacher_pool"].isna() & rows["teacher_seed"].isna(), "teacher_run"].dropna()
    return "; ".join(parts + [f"teacher run {run}" for run in dict.fromkeys(unknown)])


def _label_teachers(out: pd.DataFrame) -> None:
    """A row's identity includes its teacher: teacher rows are one teacher run each, and runs taught by different
    teacher runs form rows of their own (``kd (teacher seed 1)``) unless their sweep pooled teacher seeds on purpose
    (the same ``teacher_pool``). Labels change only where a table holds several teachers."""
    for _, rows in out[out["kind"] == "teacher"].groupby(["setting", "protocol", "pair", "arch"], sort=False):
        if rows["run_id"].nunique() > 1:
            seeds = rows["seed"].astype(int).astype(str)
            ambiguous = seeds.groupby(seeds).transform("size").gt(1)
            out.loc[rows.index, "label"] = rows["label"] + " (seed " + seeds + ambiguous.map(
                {True: ", run ", False: ""}) + rows["run_id"].where(ambiguous, "") + ")"
    taught = out[(out["kind"] == "method") & out["teacher_run"].notna()]
    for _, rows in taught.groupby(["setting", "protocol", "pair"], sort=False):
        key = rows["teacher_pool"].fillna(rows["teacher_run"])
        if key.nunique() > 1:
            texts = {k: teacher_text(same) for k, same in rows.groupby(key, sort=False)}
            clash = pd.Series(texts).duplicated(keep=False)  # two teachers of one seed (other teacher recipes)
            for k, same in rows.groupby(key, sort=False):
                out.loc[same.index, "label"] = same["label"] + f" ({texts[k]}{f', run {k}' if clash[k] else ''})"


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def groups(frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(title, rows) per setting and protocol: the unit that plots and the ``--by setting`` tables cover. The title
    names the device models of its runs after their device type (``cuda (NVIDIA H100, NVIDIA A100)``)."""
    for (setting, protocol), group in frame.groupby(["setting", "protocol"], sort=False):
        parts, names = setting.split(" · "), device_names(group)
        title = " · ".join(f"{part} ({', '.join(names)})" if part == group["device"].iloc[0] and names else part
                           for part in parts)
        yield (f"{title} · protocol {protocol}" if protocol != "none" else f"{title} · CE only"), group


# ---------------------------------------------------------------------------------------------- leaderboard


def by_seed(frame: pd.DataFrame, metric: str) -> pd.Series:
    return frame.groupby("seed")[metric].mean().dropna()


def differences(rows: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> tuple[pd.Series, bool]:
    """``metric`` of ``rows`` minus the baseline's per seed, over the seeds both ran (paired: True); with no seed
    in common, the difference of their means as one value (paired: False). Empty when either has no value."""
    ours, base = by_seed(rows, metric), by_seed(baseline, metric)
    common = ours.index.intersection(base.index)
    if len(common) or ours.empty or base.empty:
        return ours[common] - base[common], True
    return pd.Series([ours.mean() - base.mean()]), False


def interval(values: pd.Series) -> tuple[float, float]:
    """The CI_LEVEL confidence interval of the mean of ``values`` (t distribution, n − 1 degrees of freedom);
    NaN below two values. Paired differences make seed-to-seed noise that both runs share cancel out."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return values.mean() - half, values.mean() + half


def _delta(rows: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> dict[str, Any]:
    """Δ over the baseline with its interval and the two-sided paired t-test p of the per-seed differences (the same
    as ``scipy.stats.ttest_rel``; none below two pairs, or for differences that do not vary, where t is undefined):
    paired by seed over the common seeds, else a difference of means (no interval, no p)."""
    from scipy import stats

    diff, paired = differences(rows, baseline, metric)
    if diff.empty:
        return {}
    low, high = interval(diff) if paired else (math.nan, math.nan)
    p = float(stats.ttest_1samp(diff, 0.0).pvalue) if paired and len(diff) >= 2 and diff.std() > 0 else math.nan
    return {"delta": diff.mean(), "delta_std": diff.std(ddof=1), "delta_n": len(diff) if paired else 0,
            "delta_paired": paired, "delta_ci_low": low, "delta_ci_high": high,
            "delta_excludes_zero": bool(low > 0 or high < 0), "p": p}


def adjust(p: pd.Series, correction: str) -> pd.Series:
    """``p`` adjusted for testing every method of one table against the same baseline: ``holm`` (Holm 1979,
    step-down; controls the family-wise error rate), ``bh`` (Benjamini & Hochberg 1995; the false discovery rate) or
    ``none``. NaN (no test) stays NaN and is not counted."""
    from scipy import stats

    tested = p.dropna()
    if correction == "none" or tested.empty:
        return p
    if correction == "bh":
        done = pd.Series(stats.false_discovery_control(tested.to_numpy(), method="bh"), index=tested.index)
    else:  # the i-th smallest of m p values times (m - i + 1), made monotone
        ordered = tested.sort_values()
        done = (ordered * (len(ordered) - np.arange(len(ordered)))).cummax().clip(upper=1.0)
    return done.reindex(p.index)


def default_metric(frame: pd.DataFrame) -> tuple[str, str]:
    """``top1_at_best_val`` when every run of the tables recorded it, else ``top1_best`` and a sentence saying why.
    Teachers do not count: one imported from a checkpoint has no validation history (its row falls back, with a
    note)."""
    missing = frame.loc[frame["kind"] != "teacher"].drop_duplicates("run_id")["top1_at_best_val"].isna()
    if not missing.any():
        return "top1_at_best_val", ""
    which = "none of the" if missing.all() else f"{missing.sum()} of the"
    return "top1_best", (f"top1_at_best_val is the default, but {which} {len(missing)} runs recorded it (trained "
                         f"without a validation split), so the tables use top1_best.")


def _short_device(name: str) -> str:
    return name.removeprefix("NVIDIA ")


def _per_device(g: pd.DataFrame) -> dict[str, str]:
    """Throughput and peak memory of a row per device model: a table that pools GPU models shows them apart."""
    by = g.groupby(g["device_name"].fillna("unknown device"), sort=False)[["train_images_per_s", "peak_bytes"]].mean()
    return {"train_images_per_s_per_device": " / ".join(f"{_short_device(n)} {number(v, 1)}"
                                                        for n, v in by["train_images_per_s"].dropna().items()),
            "peak_mib_per_device": " / ".join(f"{_short_device(n)} {number(v / 2**20, 0)}"
                                              for n, v in by["peak_bytes"].dropna().items())}


def _core(table: pd.DataFrame) -> str | None:
    """The most common ``code_core`` of a table's runs (None when none recorded one: an older table)."""
    counts = table["code_core"].value_counts()
    return counts.index[0] if len(counts) else None


def _commits(rows: pd.DataFrame) -> str:
    """The git commits (short) that made ``rows``' runs, ``+dirty`` with uncommitted changes."""
    shas = rows["git_sha"].fillna("unknown").astype(str).str[:7] + rows["git_dirty"].eq(True).map(
        {True: "+dirty", False: ""})
    return ", ".join(dict.fromkeys(shas))


def _replayed(rows: pd.DataFrame) -> str:
    """How many of ``rows``' runs earlier code made and later code reproduced (kdbench replay), with the epochs each
    replay compared ("" when none)."""
    epochs = rows["replayed_epochs"].dropna().astype(str)
    return f"{len(epochs)} of {len(rows)} ({', '.join(dict.fromkeys(epochs))} epochs)" if len(epochs) else ""


def leaderboard(frame: pd.DataFrame, metric: str | None = None, published: pd.DataFrame | None = None,
                correction: str = "holm") -> pd.DataFrame:
    """One row per (table, row) of :func:`entries`: ``n``, mean and sample std of ``metric`` over seeds, Δ over
    the baseline with its interval and paired t-test ``p``, ``p_adjusted`` over the method rows of the table by
    ``correction`` and ``delta_significant`` (adjusted p < SIGNIFICANCE), mean costs (per device model in
    ``*_per_device`` where a table pools several), the teacher seeds, whether the row was made by other code than the
    rest of its table (``other_code``) and by which ``commits``, and (``published`` given) the published numbers of the
    same setting side by side, or why the setting has none (``published_mismatch``). ``metric`` None: see
    :func:`default_metric` (``metric_note`` says why when it falls back)."""
    metric, metric_note = default_metric(frame) if metric is None else (metric, "")
    if metric not in METRICS:
        raise KdbenchError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if correction not in CORRECTIONS:
        raise KdbenchError(f"unknown correction {correction!r}; valid corrections: {', '.join(CORRECTIONS)}")
    if frame[metric].isna().all():
        raise KdbenchError(f"no finished run recorded {metric}")
    rows = []
    for (setting, protocol, pair), table in frame.groupby(["setting", "protocol", "pair"], sort=False):
        baseline, core = table[table["kind"] == "student"], _core(table)
        mixed_devices = len(device_names(table)) > 1
        teachers = teacher_text(table[table["kind"] == "method"])
        for (kind, arch, label), g in table.groupby(["kind", "arch", "label"], sort=False):
            first, shown = g.iloc[0], metric
            if kind == "teacher" and g[metric].isna().all():  # an imported checkpoint: no validation history
                shown = next((m for m in ("top1_last", "top1_best") if g[m].notna().any()), metric)
            values = g[shown].dropna()
            row = {"setting": setting, "protocol": protocol, "pair": pair, "kind": kind, "label": label, "arch": arch,
                   "method": first["method"], "method_options": first["method_options"],
                   "method_note": first["method_note"], "dataset": first["dataset"], "recipe": first["recipe"],
                   "device": first["device"], "device_name": ", ".join(device_names(g)),
                   "precision": first["precision"], "metric": metric, "metric_shown": shown,
                   "metric_note": metric_note, "n": len(values), "mean": values.mean(), "std": values.std(ddof=1),
                   "seeds": ",".join(str(s) for s in sorted(g["seed"].unique())),
                   "teacher_seeds": teacher_text(g) if kind == "method" else "", "table_teachers": teachers,
                   "delta": math.nan, "delta_std": math.nan, "delta_n": 0, "delta_paired": False,
                   "delta_ci_low": math.nan, "delta_ci_high": math.nan, "delta_excludes_zero": False, "p": math.nan,
                   "train_images_per_s": g["train_images_per_s"].mean(), "peak_bytes": g["peak_bytes"].mean(),
                   "memory_metric": first["memory_metric"], "extra_params_train": g["extra_params_train"].mean(),
                   "inference_params": g["inference_params"].mean(), "end_to_end_s": g["end_to_end_s"].mean(),
                   "assistants_in_full": bool(g["assistants_in_full"].any()),
                   "cost_sitting": first["cost_sitting"] if isinstance(first["cost_sitting"], str) else "",
                   "trained_in": first["trained_in"] if isinstance(first["trained_in"], str) else None,
                   # made by other code: shared code unlike most of the table's runs, or seeds run by different code
                   "other_code": core is not None and bool(g["code_core"].ne(core).any()
                                                           or g["code_fingerprint"].nunique(dropna=False) > 1),
                   "commits": _commits(g), "replayed": _replayed(g),
                   # one sitting's machine priced a row it shows costs for (shown_costs): its speeds are not split
                   **(_per_device(g) if mixed_devices and not isinstance(first["cost_sitting"], str)
                      else {"train_images_per_s_per_device": "", "peak_mib_per_device": ""})}
            if kind == "method":
                row.update(_delta(g, baseline[baseline["arch"] == arch], metric))
            if published is not None:
                row.update(published_cells(published, pair, kind, arch, first, protocol, metric, CE_ONLY))
            rows.append(row)
    board = pd.DataFrame(rows)
    order = ["setting", "protocol", "pair"]
    board["p_adjusted"] = board.groupby(order, sort=False)["p"].transform(lambda p: adjust(p, correction))
    board["correction"] = correction
    board["delta_significant"] = board["p_adjusted"].lt(SIGNIFICANCE)
    board["_order"] = board["kind"].map(KIND_ORDER)
    board["_rank"] = -board["mean"].where(board["kind"] == "method", math.inf)
    board["_table"] = board.groupby(order, sort=False).ngroup()
    return board.sort_values(["_table", "_order", "_rank", "label"]).drop(columns=["_order", "_rank", "_table"]) \
        .reset_index(drop=True)


def mean_ranks(board: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, protocol, method label): the mean over pairs of the method's rank by ``mean`` among the methods
    of each pair (1 = best; ties share the mean rank), its sample std over pairs, the pairs it was ranked on and the
    pairs of its group (DKD-style summary, Zhao et al., CVPR 2022). A method missing on a pair is ranked on the pairs
    where it ran."""
    methods = board[board["kind"] == "method"].copy()
    keys = ["setting", "protocol"]
    methods["rank"] = methods.groupby([*keys, "pair"], sort=False)["mean"].rank(ascending=False, method="average")
    ranks = methods.groupby([*keys, "label"], sort=False)["rank"].agg(mean_rank="mean", mean_rank_std="std",
                                                                      ranked_pairs="count").reset_index()
    pairs = board.groupby(keys, sort=False)["pair"].nunique().rename("pairs").reset_index()
    return ranks.merge(pairs, on=keys)


# ------------------------------------------------------------------------------------------ paired comparison


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
    per_seed = pd.concat({a: by_seed(left, metric), b: by_seed(right, metric)}, axis=1).dropna()
    per_seed["difference"] = per_seed[a] - per_seed[b]
    diff = per_seed["difference"]
    summary = {**key, "metric": metric, "n": len(diff), "mean": diff.mean(), "std": diff.std(ddof=1),
               "t": math.nan, "p": math.nan}
    if len(diff) >= 2:
        from scipy import stats

        test = stats.ttest_rel(per_seed[a], per_seed[b])
        summary.update(t=float(test.statistic), p=float(test.pvalue))
    return per_seed.rename_axis("seed").reset_index(), summary
