"""The paper layout: per setting and protocol, methods as rows and pairs as columns, as CRD (Tian et al., ICLR 2020,
Table 1), DKD (Zhao et al., CVPR 2022, Table 1) and SemCKD (Chen et al., AAAI 2021, Table 2) print them; teacher and
CE student on top, the best method per pair in bold, published numbers of the same setting beside their pair, and a
cost table in the same layout."""

from __future__ import annotations

import pandas as pd

from kdbench.report.aggregate import groups
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


def _name(label: str) -> str:
    return {"teacher": "Teacher", "student (CE)": "Student (CE)"}.get(label, label)


def _accuracy(group: pd.DataFrame, title: str, fmt: str) -> str:
    metric, pairs = group["metric"].iloc[0], list(dict.fromkeys(group["pair"]))
    methods = group[group["kind"] != "teacher"]
    n = int(methods["n"].mode().iloc[0]) if len(methods) else 1
    with_published = [p for p in pairs if group.loc[group["pair"] == p, "published"].fillna("").ne("").any()] \
        if "published" in group.columns else []
    best = {p: round(group[(group["pair"] == p) & (group["kind"] == "method")]["mean"].max(), 2) for p in pairs}
    notes, footnotes = method_notes(group)
    footnotes += flag_footnotes(group)
    headers, align = ["method"], ["l"]
    for pair in pairs:
        headers += [pair] + (["published"] if pair in with_published else [])
        align += ["r"] + (["r"] if pair in with_published else [])
    rows, rules_after, missing = [], [], False
    for index, (kind, label) in enumerate(_rows(group)):
        first = group[group["label"] == label].iloc[0]
        note = first["method_note"] if isinstance(first["method_note"], str) else ""
        row = [escape(_name(label) + (f" [{notes.index(note) + 1}]" if note else ""), fmt)]
        for pair in pairs:
            r = _cell(group, pair, label)
            missing |= r is None
            text = MISSING if r is None else mean_std(r["mean"], r["std"]) + (
                f" (n = {r['n']})" if kind != "teacher" and r["n"] != n else "") + markers(r.get("flags"))
            text = escape(text, fmt)
            is_best = r is not None and kind == "method" and round(r["mean"], 2) == best[pair]
            row.append(bold(text, fmt) if is_best else text)
            if pair in with_published:
                row.append(escape("" if r is None else r["published"], fmt))
        rows.append(row)
        if kind != "method":
            rules_after = [index]
    epoch = "best" if metric == "top1_best" else "last"
    caption = (f"Top-1 accuracy (%, {epoch} epoch of each run): mean ± std over n = {n} seed{'s' * (n != 1)} "
               f"(other n marked), teacher: one run; best method per pair in bold. {title}.")
    why = published_note(group)
    if missing:
        footnotes.append(f"{MISSING}: no finished run of this method on this pair (not run, or every seed failed; the "
                         "report lists the failed runs and their reasons).")
    footnotes += teacher_notes(group)
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
        for _, label in _rows(group):
            r = _cell(group, pair, label)
            if r is not None:
                values = [number(r["train_images_per_s"], 1), number(r["peak_bytes"] / 2**20, 0),
                          count(r["extra_params_train"]), number(r["end_to_end_s"] / 60, 1)]
                rows.append([escape(_name(label), fmt), *(escape(v, fmt) for v in values)])
        rules_after.append(len(rows) - 1)
    caption = (f"Cost per method: training throughput (img/s, mean over seeds), peak memory "
               f"({memory_name(group)}, MiB), parameters added for training, and end-to-end wall time in minutes "
               f"(the run plus its teacher's and teacher assistants' training and fitting). {title}.")
    return table(headers, rows, fmt, align, caption=caption, rules_after=rules_after, sections=sections)


def paper_tables(board: pd.DataFrame, fmt: str) -> list[str]:
    """Per setting and protocol: a heading, the accuracy table and the cost table."""
    blocks = []
    for title, group in groups(board):
        blocks += [paragraph(title, fmt, heading=True), _accuracy(group, title, fmt), _costs(group, title, fmt)]
    return blocks


def paper_csv(board: pd.DataFrame) -> str:
    """The paper tables' numbers, one row per (setting, protocol, row) and a column per (pair, measure)."""
    measures = ["n", "mean", "std", *(column for _, column in _COSTS), *(["flags"] if "flags" in board else [])]
    wide = rounded(board).pivot_table(index=["setting", "protocol", "label"], columns="pair", values=measures,
                                      aggfunc="first", sort=False)
    wide.columns = [f"{pair} {measure}" for measure, pair in wide.columns]
    counts = [c for c in wide.columns if c.endswith(" n")]
    wide[counts] = wide[counts].astype("Int64")  # the pivot made floats of them
    pairs = list(dict.fromkeys(board["pair"]))
    return wide[[f"{p} {m}" for p in pairs for m in measures if f"{p} {m}" in wide.columns]].reset_index().to_csv(
        index=False)
