"""Flags: a marker on every shown row whose number needs a caveat to be read right, with a one-line footnote.

A number on a leaderboard reads as "this method, as published, on this pair"; five things break that reading, and
each marks the row wherever it is shown (leaderboard, paper layout, CSV, plots):

- ``weak_teacher`` [w]: a teacher or teacher assistant the row learned from is not above the mean CE student of its
  table (on the report's metric), so the row measures the trainer more than the method (a student gains from a
  teacher it can follow: Mirzadeh et al., AAAI 2020, the TAKD paper; the reference set's TAKD and DGKD assistants,
  docs/reference-results.md). The teacher's own row carries it, and the report warns in one line
  (:func:`teacher_warnings`).
- ``diverged_default`` [d]: runs of the same method at its default options (no ``method_overrides``) failed with a
  non-finite loss in the row's setting, protocol and pair, and the row sets options of its own, so it is not the
  method as published (SemCKD at β = 400 on resnet56 → resnet20).
- ``deviation`` [o]: the method declares a documented deviation from its official code for the row's options
  (``Method.deviation_of``: OFD's eval-mode teacher, SAKD's reconstruction, CC's code version). A run's
  ``method_note`` that states the same text is shown once, as this flag, not again as a numbered note.
- ``still_improving`` [e]: in some of the row's runs the epoch the metric picks is the last one (``top1_best_epoch``,
  or ``top1_at_best_val_epoch`` for ``top1_at_best_val``, equal to ``epochs_completed``): training stopped while
  the run was still improving, so a longer recipe may rank it differently.
- ``few_seeds`` [n]: the row has fewer runs than the table's fullest method or CE row (SemCKD on vgg13 → vgg8 in
  the reference set, given three seeds for its cost), so its interval is wider and its test weaker than its
  neighbours'.

Flags are computed per leaderboard row from its runs (:func:`~kdbench.report.aggregate.entries`) and the tidy table,
which alone holds assistant runs and failed runs; a method's declaration comes from its class, as ``family_of``.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import pandas as pd

from kdbench.errors import KdbenchError
from kdbench.report.aggregate import _OPTION, CE_ONLY
from kdbench.report.load import _RECIPE_PARTS, best_at_last, runs


@dataclass(frozen=True)
class Flag:
    """How a flag shows: a marker short enough for a table cell or a tick label, and its footnote's opening."""

    marker: str  # shown after the row's name (leaderboard, plots) or in its cell (paper layout)
    meaning: str  # how its footnote starts


FLAGS = {
    "weak_teacher": Flag("[w]", "teacher or assistant not above the CE student of its table"),
    "diverged_default": Flag("[d]", "diverged (non-finite loss) at the method's default options; this row's differ"),
    "deviation": Flag("[o]", "deviates from the official code"),
    "still_improving": Flag("[e]", "best epoch = last epoch, still improving when training stopped (seeds; their "
                                   "last evaluation's mean rise over the one before, in points)"),
    "few_seeds": Flag("[n]", "fewer seeds than the other rows of its table"),
}
KEYS = ["setting", "protocol", "pair", "kind", "arch", "label"]  # what makes a leaderboard row
# The epoch a metric picks, where it is not top1_best_epoch: a validation-selected metric's own epoch.
_SELECTED_EPOCH = {"top1_at_best_val": "top1_at_best_val_epoch"}
# How much the curve that picks a metric's epoch rose at the last evaluation (kdbench.report.load), where it is not
# the test top-1's.
_SELECTED_ON = {"top1_at_best_val": "val_top1_last_gain"}
# What runs must share to be compared: the identity columns of a setting (kdbench.report.load, its recipe parts read
# from there, so that a new one such as the validation split counts here too), the table's protocol and pair, and the
# method.
_SAME_TABLE = ["dataset", "recipe", *(key for key, _ in _RECIPE_PARTS), "device", "precision", "channels_last",
               "compile", "protocol", "pair", "method"]


def row_flags(frame: pd.DataFrame, table: pd.DataFrame, metric: str = "top1_best") -> pd.DataFrame:
    """One row per leaderboard row (``KEYS``) of ``frame`` (:func:`entries` of ``table``): ``flags``, the keys of
    the flags that mark it (";"-joined, "" for none), and per flag ``flag_<key>``, what it shows ("" where unset)."""
    trainers = runs(table)
    assistants = trainers[trainers["role"] == "assistant"]
    failed = _default_divergences(table)
    rows = []
    for (setting, protocol, pair), t in frame.groupby(["setting", "protocol", "pair"], sort=False):
        ce = t.loc[t["kind"] == "student", metric].mean()
        most = t[t["kind"] != "teacher"].groupby(["kind", "arch", "label"], sort=False).size().max()
        for (kind, arch, label), g in t.groupby(["kind", "arch", "label"], sort=False):
            shown = {"weak_teacher": _weak_trainers(g, t, kind, ce, assistants, metric),
                     "diverged_default": _diverged_default(g, failed) if kind == "method" else "",
                     "deviation": _deviation(g.iloc[0]) if kind == "method" else "",
                     "still_improving": _still_improving(g, metric),
                     "few_seeds": f"n = {len(g)} of {most}" if kind != "teacher" and len(g) < most else ""}
            rows.append({"setting": setting, "protocol": protocol, "pair": pair, "kind": kind, "arch": arch,
                         "label": label, "flags": ";".join(key for key, text in shown.items() if text),
                         **{f"flag_{key}": text for key, text in shown.items()}})
    return pd.DataFrame(rows, columns=[*KEYS, "flags", *(f"flag_{key}" for key in FLAGS)])


def add_flags(board: pd.DataFrame, frame: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``board`` (:func:`leaderboard` of ``frame``) with the columns of :func:`row_flags`; a ``method_note`` that the
    deviation flag states is cleared, so that the text is shown once."""
    flagged = board.merge(row_flags(frame, table, board["metric"].iloc[0]), on=KEYS, how="left")
    flagged[["flags", *(f"flag_{key}" for key in FLAGS)]] = flagged[
        ["flags", *(f"flag_{key}" for key in FLAGS)]].fillna("")
    flagged.loc[flagged["method_note"] == flagged["flag_deviation"], "method_note"] = ""
    return flagged


def _weak_trainers(g: pd.DataFrame, table: pd.DataFrame, kind: str, ce: float, assistants: pd.DataFrame,
                   metric: str) -> str:
    """The row's teacher and assistant runs whose ``metric`` is not above the CE mean ``ce``, per architecture."""
    if pd.isna(ce) or kind == "student":
        return ""
    if kind == "teacher":
        weak = [(f"teacher {r.arch}", value, r.seed) for r, value in zip(g.itertuples(), g[metric]) if value <= ce]
    else:
        teachers = table[(table["kind"] == "teacher") & table["run_id"].isin(set(g["teacher_run"].dropna()))]
        weak = [(f"teacher {r.arch}", value, None) for r, value in zip(teachers.itertuples(), teachers[metric])
                if value <= ce]
        for _, run in g.iterrows():
            chain = _assistants_of(run, assistants)
            weak += [(f"assistant {a.student}", value, run["seed"])
                     for a, value in zip(chain.itertuples(), chain[metric]) if value <= ce]
    if not weak:
        return ""
    parts = []
    for who, values in pd.DataFrame(weak, columns=["who", "value", "seed"]).groupby("who", sort=False):
        low, high = values["value"].min(), values["value"].max()
        seeds = values["seed"].dropna().nunique()
        parts.append(f"{who} {low:.2f}" + (f"–{high:.2f}" if high > low else "") + " %"
                     + (f" in {seeds} of {len(g)} seeds" if 0 < seeds < len(g) else ""))
    return ", ".join(parts) + f" vs CE {ce:.2f} %"


def _assistants_of(run: pd.Series, assistants: pd.DataFrame) -> pd.DataFrame:
    """The finished assistant runs that taught ``run``: those its ``assistant_runs`` names where the table records
    them, else, per architecture of its chain, the assistant of the same setting, protocol, teacher run and seed
    trained along the same chain before it (the run's own method first: TAKD's and DGKD's second assistants differ)."""
    named = run.get("assistant_runs")
    if isinstance(named, str) and named:
        return assistants[assistants["run_id"].isin(named.split(":"))]
    chain = run["assistants"].split(":") if isinstance(run["assistants"], str) and run["assistants"] else []
    found = []
    for depth, arch in enumerate(chain):
        candidates = assistants[(assistants["student"] == arch) & (assistants["seed"] == run["seed"])
                                & (assistants["setting"] == run["setting"])
                                & (assistants["protocol"] == run["protocol"])
                                & (assistants["teacher_run"] == run["teacher_run"])
                                & (assistants["assistants"].fillna("") == ":".join(chain[:depth]))]
        found.append(candidates.sort_values("method", key=lambda m: m != run["method"]).head(1))
    return pd.concat(found) if found else assistants.iloc[:0]


def _default_divergences(table: pd.DataFrame) -> pd.DataFrame:
    """The failed runs at their method's default options whose loss became non-finite (the harness's RunFailed,
    KDSVD's SVD of non-finite input), one row each."""
    failed = table[table["status"] == "failed"].drop_duplicates("run_id")
    return failed[failed["error"].fillna("").str.contains("non-finite")
                  & failed["method_overrides"].fillna("").eq("")]


def _diverged_default(g: pd.DataFrame, failed: pd.DataFrame) -> str:
    first = g.iloc[0]
    overrides = first["method_overrides"] if isinstance(first["method_overrides"], str) else ""
    if not overrides:
        return ""
    same = failed.merge(g[_SAME_TABLE].drop_duplicates(), on=_SAME_TABLE)
    if same.empty:
        return ""
    return f"{len(same)} run{'s' * (len(same) > 1)} at the defaults failed; {overrides}"


def _deviation(first: pd.Series) -> str:
    """What the row's method declares as its deviation from the official code for the row's options (rows of one
    label share their options); "" for a method this installation does not have."""
    from kdbench.methods import method_class

    try:
        cls = method_class(first["method"])
    except KdbenchError:
        return ""
    options = first["method_options"] if isinstance(first["method_options"], str) else ""
    return cls.deviation_of(dict(_OPTION.findall(options)))


def _still_improving(g: pd.DataFrame, metric: str) -> str:
    """How many of the row's runs picked their last epoch (where the table records the epochs), and by how much
    those runs' last evaluation beat the one before, on the accuracy that picks the epoch."""
    last, recorded, rise = best_at_last(g, _SELECTED_EPOCH.get(metric, "top1_best_epoch"),
                                        _SELECTED_ON.get(metric, "top1_last_gain"))
    return (f"{last} of {recorded} seed{'s' * (recorded > 1)}" + (f", {rise:+.2f}" if pd.notna(rise) else "")
            if last else "")


def markers(flags: object) -> str:
    """The markers of a row's ``flags`` (as :func:`row_flags` writes them), each after a space; "" for none."""
    if not isinstance(flags, str) or not flags:
        return ""
    return "".join(f" {FLAGS[key].marker}" for key in flags.split(";"))


def footnotes(rows: pd.DataFrame) -> list[str]:
    """A line per flag that marks any of ``rows`` (a line per text for ``deviation``), naming the rows, with their
    pair where ``rows`` hold several, and what each shows. None where ``rows`` carry no flags."""
    if "flags" not in rows:
        return []
    several = rows["pair"].nunique() > 1
    lines = []
    for key, flag in FLAGS.items():
        marked = rows[rows[f"flag_{key}"].fillna("") != ""]
        if key == "deviation":
            lines += [f"{flag.marker} {', '.join(dict.fromkeys(same['label']))}: {flag.meaning}: {text}"
                      for text, same in marked.groupby(f"flag_{key}", sort=False)]
        elif len(marked):
            lines.append(f"{flag.marker} {flag.meaning}: " + "; ".join(
                f"{r.label}{f' on {r.pair}' if several else ''} ({getattr(r, f'flag_{key}')})"
                for r in marked.itertuples()))
    return lines


def teacher_warnings(board: pd.DataFrame) -> list[str]:
    """A line per table whose teacher is not above its CE student (on the board's metric)."""
    lines = []
    for (setting, protocol, pair), t in board[board["pair"] != CE_ONLY].groupby(["setting", "protocol", "pair"],
                                                                            sort=False):
        students = t[t["kind"] == "student"]
        for teacher in t[t["kind"] == "teacher"].itertuples():
            lines += [f"warning: teacher {teacher.arch} ({teacher.mean:.2f} %) is not above its CE student "
                      f"{student.arch} ({student.mean:.2f} %) in {pair} · {setting} · protocol {protocol}"
                      for student in students.itertuples() if teacher.mean <= student.mean]
    return lines


def for_plots(group: pd.DataFrame, flagged: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``group`` (one setting and protocol of :func:`entries`) with each label followed by the markers its rows
    carry in any pair of the group, so that a label keeps one colour and marker across panels, and the footnotes of
    the group's flagged rows (they name the pair)."""
    mine = flagged.merge(group[KEYS].drop_duplicates(), on=KEYS)
    keys = mine.groupby("label", sort=False)["flags"].agg(
        lambda f: ";".join(key for key in FLAGS if key in ";".join(f).split(";")))
    return group.assign(label=group["label"] + group["label"].map(keys).map(markers)), footnotes(mine)


def caption(fig, lines: list[str]) -> None:
    """``lines`` (footnotes) under the panels of ``fig``, wrapped to its width; the figure grows to hold them."""
    if not lines:
        return
    chars = int(fig.get_figwidth() * 17)  # about 17 characters of 7-point text per inch
    text = "\n".join(textwrap.fill(line, chars, subsequent_indent="    ") for line in lines)
    fig.set_figheight(fig.get_figheight() + 0.15 * (text.count("\n") + 1))
    fig.supxlabel(text, x=0.01, ha="left", fontsize=7, multialignment="left")
