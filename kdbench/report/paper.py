"""The paper layout: per setting and protocol, methods as rows and pairs as columns, as CRD (Tian et al., ICLR 2020,
Table 1), DKD (Zhao et al., CVPR 2022, Table 1) and SemCKD (Chen et al., AAAI 2021, Table 2) print them; teacher and
CE student on top, the best method per pair in bold, published numbers of the same setting beside their pair, and a
cost table in the same layout."""

from __future__ import annotations

import pandas as pd

from kdbench.report.aggregate import METRIC_RULES, groups, mean_ranks
from kdbench.report.flags import footnotes as flag_footnotes
from kdbench.report.flags import markers
from kdbench.report.formats import (
    bold,
    count,
    escape,
    mean_std,
    method_notes,
    number,
    paragraph,
    rounded,
    table,
    teacher_notes,
)
from kdbench.report.load import memory_name
from kdbench.report.notes import SIGNIFICANT, cost_note, device_note, metric_notes, significance_note
from kdbench.report.published import published_note, unpublished_pairs_note

MISSING = "–"  # a cell without a finished run: said, never left blank
_TOP = ("teacher", "student")  # kinds printed above the methods, in this order
_COSTS = (("img/s", "train_images_per_s"), ("peak MiB", "peak_bytes"), ("extra params", "extra_params_train"),
          ("end-to-end min", "end_to_end_s"))


def _rows(group: pd.DataFrame) -> list[tuple[str, str]]:
    """(kind, label) of the table's rows: teacher, CE student, then methods by their mean over pairs."""
    methods = group[group["kind"] == "method"].groupby("label", sort=False)["mean"].mean()
    top = [tuple(k) for k in group[group["kind"].isin(_TOP)][["kind", "label"]].drop_duplicates().to_numpy()]
    top.sort(key=lambda key: _TOP.index(key[0]))
    return top + [("method", label) for label in methods.sort_values(ascending=False, kind="stable").index]


def _cell(group: pd.DataFrame, pair: str, label: str) -> pd.Series | None:
    rows = group[(group["pair"] == pair) & (group["label"] == label)]
    return rows.iloc[0] if len(rows) else None


def _name(kind: str, label: str) -> str:
    return label if kind == "method" else label[0].upper() + label[1:]


def _rank_cell(ranks: pd.DataFrame, label: str) -> str:
    if label not in ranks.index:
        return ""
    r = ranks.loc[label]
    ranked = int(r["ranked_pairs"])
    return mean_std(r["mean_rank"], r["mean_rank_std"]) + (f" ({ranked} pair{'s' * (ranked != 1)})"
                                                            if ranked < r["pairs"] else "")


def _accuracy(group: pd.DataFrame, title: str, fmt: str) -> str:
    metric, pairs = group["metric"].iloc[0], list(dict.fromkeys(group["pair"]))
    methods = group[group["kind"] != "teacher"]
    n = int(methods["n"].mode().iloc[0]) if len(methods) else 1
    with_published = [p for p in pairs if group.loc[group["pair"] == p, "published"].fillna("").ne("").any()] \
        if "published" in group.columns else []
    best = {p: round(group[(group["pair"] == p) & (group["kind"] == "method")]["mean"].max(), 2) for p in pairs}
    ranks = mean_ranks(group).set_index("label")
    notes, footnotes = method_notes(group)
    footnotes += flag_footnotes(group)
    headers, align = ["method"], ["l"]
    for pair in pairs:
        headers += [pair] + (["published"] if pair in with_published else [])
        align += ["r"] + (["r"] if pair in with_published else [])
    headers, align = [*headers, "mean rank"], [*align, "r"]
    rows, rules_after, missing = [], [], False
    for index, (kind, label) in enumerate(_rows(group)):
        first = group[group["label"] == label].iloc[0]
        note = first["method_note"] if isinstance(first["method_note"], str) else ""
        row = [escape(_name(kind, label) + (f" [{notes.index(note) + 1}]" if note else ""), fmt)]
        for pair in pairs:
            r = _cell(group, pair, label)
            missing |= r is None
            text = MISSING if r is None else mean_std(r["mean"], r["std"]) + (
                f" (n = {r['n']})" if kind != "teacher" and r["n"] != n else "") + markers(r.get("flags"))
            text = escape(text, fmt)
            is_best = r is not None and kind == "method" and round(r["mean"], 2) == best[pair]
            row.append((bold(text, fmt) if is_best else text)
                       + (f" {SIGNIFICANT}" if r is not None and r["delta_significant"] else ""))
            if pair in with_published:
                row.append(escape("" if r is None else r["published"], fmt))
        rows.append([*row, escape(_rank_cell(ranks, label) if kind == "method" else "", fmt)])
        if kind != "method":
            rules_after = [index]
    teachers = group[group["kind"] == "teacher"]
    seeds = sorted(teachers["seeds"].unique(), key=str)
    caption = (f"Top-1 accuracy (%, {metric}: {METRIC_RULES[metric]}): mean ± std over n = {n} seed"
               f"{'s' * (n != 1)} (other n marked), teacher: one run (seed{'s' * (len(seeds) > 1)} "
               f"{', '.join(seeds)}); best method per pair in bold; mean rank over pairs ± std (1 = best). {title}.")
    why = published_note(group)
    if missing:
        footnotes.append(f"{MISSING}: no finished run of this method on this pair (not run, or every seed failed; the "
                         "report lists the failed runs and their reasons).")
    fewer = ranks[ranks["ranked_pairs"] < ranks["pairs"]]
    if len(fewer):
        footnotes.append("mean rank: a method missing on some pairs is ranked on the pairs where it ran: "
                         + ", ".join(f"{label} on {r.ranked_pairs} of {r.pairs}" for label, r in fewer.iterrows())
                         + ".")
    if group["p"].notna().any():
        footnotes.append(significance_note(group))
    footnotes += teacher_notes(group) + metric_notes(group)
    if with_published:
        footnotes.append("published: the source's number for the same pair, recipe and protocol (see "
                         "`--layout leaderboard` for the sources).")
    footnotes += [note for note in (why, unpublished_pairs_note(group)) if note]
    return table(headers, rows, fmt, align, caption=caption, notes=footnotes, rules_after=rules_after)


def _costs(group: pd.DataFrame, title: str, fmt: str) -> str:
    """Pairs stacked as blocks of rows under the pair's name, so that the table keeps one column per measure and
    fits a page at any number of pairs."""
    pairs = list(dict.fromkeys(group["pair"]))
    headers, align = ["method", *(name for name, _ in _COSTS)], ["l", *["r"] * len(_COSTS)]
    rows, rules_after, sections = [], [], {}
    for pair in pairs:
        sections[len(rows)] = pair
        for kind, label in _rows(group):
            r = _cell(group, pair, label)
            if r is not None:
                values = [r["train_images_per_s_per_device"] or number(r["train_images_per_s"], 1),
                          r["peak_mib_per_device"] or number(r["peak_bytes"] / 2**20, 0),
                          count(r["extra_params_train"]), number(r["end_to_end_s"] / 60, 1)]
                rows.append([escape(_name(kind, label), fmt), *(escape(v, fmt) for v in values)])
        rules_after.append(len(rows) - 1)
    caption = (f"Cost per method: training throughput (img/s, mean over seeds), peak memory "
               f"({memory_name(group)}, MiB), parameters added for training, and end-to-end wall time in minutes. "
               f"{cost_note(group)[0].upper()}{cost_note(group)[1:]} {title}.")
    return table(headers, rows, fmt, align, caption=caption, rules_after=rules_after, sections=sections,
                 notes=[note for note in (device_note(group),) if note])


def paper_tables(board: pd.DataFrame, fmt: str) -> list[str]:
    """Per setting and protocol: a heading, the accuracy table and the cost table."""
    blocks = []
    for title, group in groups(board):
        blocks += [paragraph(title, fmt, heading=True), _accuracy(group, title, fmt), _costs(group, title, fmt)]
    return blocks


def paper_csv(board: pd.DataFrame) -> str:
    """The paper tables' numbers, one row per (setting, protocol, row) and a column per (pair, measure)."""
    measures = ["n", "mean", "std", *(column for _, column in _COSTS), *(["flags"] if "flags" in board else []),
                *(["cost_sitting"] if board["cost_sitting"].ne("").any() else [])]  # where img/s and cost come from
    wide = rounded(board).pivot_table(index=["setting", "protocol", "label"], columns="pair", values=measures,
                                      aggfunc="first", sort=False)
    wide.columns = [f"{pair} {measure}" for measure, pair in wide.columns]
    counts = [c for c in wide.columns if c.endswith(" n")]
    wide[counts] = wide[counts].astype("Int64")  # the pivot made floats of them
    pairs = list(dict.fromkeys(board["pair"]))
    wide = wide[[f"{p} {m}" for p in pairs for m in measures if f"{p} {m}" in wide.columns]].reset_index()
    ranks = mean_ranks(board).round({"mean_rank": 2, "mean_rank_std": 2})
    return wide.merge(ranks, on=["setting", "protocol", "label"], how="left", sort=False).to_csv(index=False)
