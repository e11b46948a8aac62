"""The paper layout: per setting and protocol, methods as rows and pairs as columns, as CRD (Tian et al., ICLR 2020,
Table 1), DKD (Zhao et al., CVPR 2022, Table 1) and SemCKD (Chen et al., AAAI 2021, Table 2) print them; teacher and
CE student on top, the best method per pair in bold, published numbers of the same setting beside their pair, and a
cost table in the same layout."""

from __future__ import annotations

import pandas as pd

from kdbench.report.aggregate import groups
from kdbench.report.formats import (
    bold,
    count,
    duration,
    escape,
    mean_std,
    method_notes,
    number,
    paragraph,
    rounded,
    table,
)
from kdbench.report.load import memory_name
from kdbench.report.published import published_note

_TOP = ("teacher", "student")  # kinds printed above the methods, in this order
_COSTS = (("img/s", "train_images_per_s"), ("peak MiB", "peak_bytes"), ("extra params", "extra_params_train"),
          ("end-to-end", "end_to_end_s"))


def _rows(group: pd.DataFrame) -> list[tuple[str, str]]:
    """(kind, label) of the table's rows: teacher, CE student, then methods by their mean over pairs."""
    methods = group[group["kind"] == "method"].groupby("label", sort=False)["mean"].mean()
    top = [tuple(k) for k in group[group["kind"].isin(_TOP)][["kind", "label"]].drop_duplicates().to_numpy()]
    top.sort(key=lambda key: _TOP.index(key[0]))
    return top + [("method", label) for label in methods.sort_values(ascending=False, kind="stable").index]


def _cell(group: pd.DataFrame, pair: str, label: str) -> pd.Series | None:
    rows = group[(group["pair"] == pair) & (group["label"] == label)]
    return rows.iloc[0] if len(rows) else None


def _name(label: str) -> str:
    return {"teacher": "Teacher", "student (CE)": "Student (CE)"}.get(label, label)


def _accuracy(group: pd.DataFrame, title: str, fmt: str) -> str:
    metric, pairs = group["metric"].iloc[0], list(dict.fromkeys(group["pair"]))
    methods = group[group["kind"] != "teacher"]
    n = int(methods["n"].mode().iloc[0]) if len(methods) else 1
    with_published = [p for p in pairs if group.loc[group["pair"] == p, "published"].fillna("").ne("").any()] \
        if "published" in group.columns else []
    best = {p: group[(group["pair"] == p) & (group["kind"] == "method")]["mean"].max() for p in pairs}
    notes, footnotes = method_notes(group)
    headers, align = ["method"], ["l"]
    for pair in pairs:
        headers += [pair] + (["published"] if pair in with_published else [])
        align += ["r"] + (["r"] if pair in with_published else [])
    rows, rules_after = [], []
    for index, (kind, label) in enumerate(_rows(group)):
        first = group[group["label"] == label].iloc[0]
        note = first["method_note"] if isinstance(first["method_note"], str) else ""
        row = [escape(_name(label) + (f" [{notes.index(note) + 1}]" if note else ""), fmt)]
        for pair in pairs:
            r = _cell(group, pair, label)
            text = "" if r is None else mean_std(r["mean"], r["std"]) + (
                f" (n = {r['n']})" if kind != "teacher" and r["n"] != n else "")
            text = escape(text, fmt)
            row.append(bold(text, fmt) if r is not None and kind == "method" and r["mean"] == best[pair] else text)
            if pair in with_published:
                row.append(escape("" if r is None else r["published"], fmt))
        rows.append(row)
        if kind != "method":
            rules_after = [index]
    epoch = "best" if metric == "top1_best" else "last"
    caption = (f"Top-1 accuracy (%, {epoch} epoch of each run): mean ± std over n = {n} seed{'s' * (n != 1)} "
               f"(other n marked), teacher: one run; best method per pair in bold. {title}.")
    why = published_note(group)
    if with_published:
        footnotes.append("published: the source's number for the same pair, recipe and protocol (see "
                         "`--layout leaderboard` for the sources).")
    elif why:
        footnotes.append(why)
    return table(headers, rows, fmt, align, caption=caption, notes=footnotes, rules_after=rules_after)


def _costs(group: pd.DataFrame, title: str, fmt: str) -> str:
    pairs = list(dict.fromkeys(group["pair"]))
    headers, align = ["method"], ["l"]
    for _ in pairs:
        headers += [name for name, _ in _COSTS]
        align += ["r"] * len(_COSTS)
    rows = []
    for _, label in _rows(group):
        row = [escape(_name(label), fmt)]
        for pair in pairs:
            r = _cell(group, pair, label)
            values = [None] * len(_COSTS) if r is None else [
                number(r["train_images_per_s"], 1), number(r["peak_bytes"] / 2**20, 0),
                count(r["extra_params_train"]), duration(r["end_to_end_s"])]
            row += [escape(v or "", fmt) for v in values]
        rows.append(row)
    caption = (f"Cost per method: training throughput (img/s, mean over seeds), peak memory "
               f"({memory_name(group)}, MiB), parameters added for training, and end-to-end wall time (the run plus "
               f"its teacher's and teacher assistants' training and fitting). {title}.")
    return table(headers, rows, fmt, align, caption=caption, column_groups=[(p, len(_COSTS)) for p in pairs])


def paper_tables(board: pd.DataFrame, fmt: str) -> list[str]:
    """Per setting and protocol: a heading, the accuracy table and the cost table."""
    blocks = []
    for title, group in groups(board):
        blocks += [paragraph(title, fmt, heading=True), _accuracy(group, title, fmt), _costs(group, title, fmt)]
    return blocks


def paper_csv(board: pd.DataFrame) -> str:
    """The paper tables' numbers, one row per (setting, protocol, row) and a column per (pair, measure)."""
    measures = ["n", "mean", "std", *(column for _, column in _COSTS)]
    wide = rounded(board).pivot_table(index=["setting", "protocol", "label"], columns="pair", values=measures,
                                      aggfunc="first", sort=False)
    wide.columns = [f"{pair} {measure}" for measure, pair in wide.columns]
    pairs = list(dict.fromkeys(board["pair"]))
    return wide[[f"{p} {m}" for p in pairs for m in measures if f"{p} {m}" in wide.columns]].reset_index().to_csv(
        index=False)
