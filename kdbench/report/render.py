"""Rendering: the per-run summary of a sweep, and leaderboards as text in two layouts.

``leaderboard``: one table per pair (or per setting), a row per method with accuracy, Δ over the CE student with its
interval, costs and published numbers. ``paper`` (:mod:`kdbench.report.paper`): methods as rows and pairs as
columns, as KD papers print them, with a cost table in the same layout. CSV: the numbers, rounded to what they can
tell (the tidy Parquet keeps full precision).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from tabulate import tabulate

from kdbench.errors import KdbenchError
from kdbench.report.aggregate import CE_ONLY, CI_NAME, CORRECTIONS, METRIC_RULES, SIGNIFICANCE, groups
from kdbench.report.flags import footnotes as flag_footnotes
from kdbench.report.flags import markers, teacher_warnings
from kdbench.report.formats import (
    FORMATS,
    count,
    duration,
    escape,
    mean_std,
    method_notes,
    number,
    paragraph,
    rounded,
    table,
    teacher_notes,
)
from kdbench.report.load import MEMORY_NAMES, describe, memory_name
from kdbench.report.notes import (
    SIGNIFICANT,
    cost_note,
    device_note,
    metric_notes,
    p_header,
    p_value,
    row_name,
    significance_note,
)
from kdbench.report.paper import paper_csv, paper_tables
from kdbench.report.published import RULE_OF_METRIC, published_note, unpublished_pairs_note

if TYPE_CHECKING:  # kdbench.results imports torch: the CLI imports this package for its choices
    from kdbench.results import RunRecord

LAYOUTS = ("leaderboard", "paper", "regime")  # regime: kdbench.report.regime, from the runs (report())
OTHER_CODE = "†"  # marks a row made by other code than the rest of its table
_MEMORY_KEYS = ("peak_alloc_bytes", "cpu_peak_rss_bytes")
def run_summary(records: list[RunRecord], tablefmt: str = "github") -> str:
    """One line per run of a sweep: accuracy, speed, memory, wall time, or why it failed. The speed of a run that
    shared its GPU (--runs-per-gpu) says with how many."""
    rows = []
    for record in records:
        spec, m = record.spec, record.metrics
        memory = next((m[k] for k in _MEMORY_KEYS if k in m), None)
        shared = record.provenance.get("device_shared_by", 1)
        speed = number(m.get("train_images_per_s"), 1)
        rows.append({
            "role": spec.role, "method": spec.method, "model": spec.pair or spec.student, "seed": spec.seed,
            "status": record.status if record.status != "failed" else f"failed: {record.error}",
            "top1 best": number(m.get("top1_best")), "top1 last": number(m.get("top1_last")),
            "train img/s": f"{speed} (GPU shared by {shared})" if speed and shared > 1 else speed,
            "step ms": number(m.get("step_ms_median"), 1),
            "peak MiB": number(memory / 2**20 if memory else None, 0), "wall s": number(m.get("wall_s"), 1),
        })
    return tabulate(rows, headers="keys", tablefmt=tablefmt)


def rule_text(board: pd.DataFrame) -> str:
    """The report's first line: the metric and how it selects its epoch, the statistics with the multiple-comparison
    correction behind every *, and what is pooled."""
    metric, correction = board["metric"].iloc[0], CORRECTIONS[board["correction"].iloc[0]]
    published = (f"Published numbers are marked [rule] when their reporting rule is not {RULE_OF_METRIC[metric]}."
                 if RULE_OF_METRIC[metric] else "Published numbers are never selected on a validation split: each is "
                 "marked with its own reporting rule, e.g. [last].")
    return (f"Top-1 = {metric} of each run: {METRIC_RULES[metric]}; mean ± sample std (ddof = 1) over the n seeds of "
            f"finished runs. {board['metric_note'].iloc[0]} Δ vs student = difference to the CE-trained student of "
            f"the same setting, paired by seed: mean ± sample std of the per-seed differences, and their {CI_NAME} "
            f"confidence interval (t distribution, n − 1 degrees of freedom, over the seeds both ran; n/a below two). "
            f"p = two-sided paired t-test of those differences, {correction}-adjusted over the methods of each table "
            f"(--correction {board['correction'].iloc[0]}); {SIGNIFICANT} = {correction}-adjusted p < {SIGNIFICANCE:g} "
            f"over the methods of each table. Runs of different datasets, recipes, protocols, device types or "
            f"precisions are never pooled: one table each; nor are runs taught by different teacher runs (each has "
            f"rows of its own). Runs that differ only in device model are pooled, and the "
            f"heading lists the models. {published}").replace("  ", " ")


def _table(board: pd.DataFrame, metric: str, with_pair: bool, fmt: str, caption: str) -> str:
    """One leaderboard table with its footnotes."""
    notes, footnotes = method_notes(board)
    footnotes += flag_footnotes(board)
    memory = memory_name(board)
    memory_header = "peak alloc MiB" if memory == MEMORY_NAMES["peak_alloc_bytes"] else "peak RSS MiB"
    why_not_published = published_note(board)
    rows, unpaired, distilled, other_code = [], False, (board["kind"] == "method").any(), []
    p_name = p_header(board["correction"].iloc[0])
    for r in board.itertuples():
        name = row_name(r)
        if r.other_code:
            other_code.append(f"{name} {r.commits}")
            name += f" {OTHER_CODE}"
        if isinstance(r.method_note, str) and r.method_note:
            name += f" [{notes.index(r.method_note) + 1}]"
        name += markers(getattr(r, "flags", ""))
        delta = mean_std(r.delta, r.delta_std, signed=True)
        ci = "" if not delta else "n/a" if pd.isna(r.delta_ci_low) else \
            f"[{r.delta_ci_low:+.2f}, {r.delta_ci_high:+.2f}]" + (f" {SIGNIFICANT}" if r.delta_significant else "")
        if r.kind == "method" and delta and not r.delta_paired:
            delta, unpaired = delta + " (unpaired)", True
        elif r.kind == "method" and delta and r.delta_n < r.n:
            delta += f" ({r.delta_n} paired)"
        row = {"pair": r.pair} if with_pair else {}
        row.update({"model": name, "n": str(r.n), f"{metric} %": mean_std(r.mean, r.std)})
        row.update({"Δ vs student": delta, f"Δ {CI_NAME} CI": ci, p_name: p_value(r.p_adjusted)} if distilled else {})
        row.update({"train img/s": r.train_images_per_s_per_device or number(r.train_images_per_s, 1),
                    memory_header: r.peak_mib_per_device or number(
                        r.peak_bytes / 2**20 if pd.notna(r.peak_bytes) else None, 0),
                    "extra train params": count(r.extra_params_train), "inference params": count(r.inference_params),
                    "end-to-end": duration(r.end_to_end_s)})
        if not why_not_published:
            row.update({"published %": r.published, "published source": r.published_source})
        rows.append(row)
    footnotes += teacher_notes(board) + metric_notes(board)
    if distilled:
        footnotes.append(significance_note(board))
    footnotes.append(f"{cost_note(board)} {memory_header}: {memory}.")
    footnotes += [note for note in (device_note(board),) if note]
    if unpaired:
        footnotes.append("(unpaired): no seed in common with the baseline; Δ is a difference of means.")
    if other_code:
        rest = dict.fromkeys(c for text in board.loc[~board["other_code"], "commits"] for c in text.split(", "))
        footnotes.append(f"{OTHER_CODE} made by other code than the rest of the table: its runs' shared harness, "
                         f"data and models code (code_core) is not the table's most common, or its seeds ran "
                         f"different code (code_fingerprint). Commits: {'; '.join(other_code)}"
                         + (f"; the other rows {', '.join(rest)}." if rest else "."))
    replayed = [f"{row_name(r)} {r.replayed}" for r in board.itertuples() if getattr(r, "replayed", "")]
    if replayed:
        footnotes.append("Runs made by earlier code and replayed by later code, every computed "
                         f"number of the epochs compared identical (kdbench replay): {'; '.join(replayed)}.")
    footnotes += [note for note in (why_not_published, unpublished_pairs_note(board)) if note]
    headers = list(rows[0])
    align = ["l" if k in ("pair", "model", "published source") else "r" for k in headers]
    cells = [[escape(str(v), fmt) for v in row.values()] for row in rows]
    return table(headers, cells, fmt, align, caption=caption if fmt == "latex" else "", notes=footnotes)


def _with_teachers(heading: str, board: pd.DataFrame) -> str:
    """A table's heading with the seeds of the teachers its rows learned from."""
    seeds = board["table_teachers"].iloc[0]
    return heading.replace(" · ", f" · {seeds} · ", 1) if seeds else heading


def _leaderboard(board: pd.DataFrame, fmt: str, by: str) -> list[str]:
    metric = board["metric"].iloc[0]
    blocks = [paragraph(rule_text(board), fmt)]
    for title, group in groups(board):
        parts = ([(f"{pair} · {title}" if pair != CE_ONLY else title, t)
                  for pair, t in group.groupby("pair", sort=False)] if by == "pair" else [(title, group)])
        parts = [(_with_teachers(heading, t) if by == "pair" else heading, t) for heading, t in parts]
        for heading, t in parts:
            blocks += [paragraph(heading, fmt, heading=True),
                       _table(t, metric, with_pair=by == "setting", fmt=fmt, caption=heading)]
    return blocks


def render_report(board: pd.DataFrame, fmt: str = "github", by: str = "pair", layout: str = "leaderboard",
                  not_finished: pd.DataFrame | None = None, duplicates: pd.DataFrame | None = None,
                  unreadable: list[str] | None = None) -> str:
    """The leaderboard as text in ``layout``: ``leaderboard`` gives one table per pair (``by="pair"``) or per
    setting and protocol (``by="setting"``), each under a heading naming what it holds, with footnotes; ``paper``
    gives, per setting and protocol, an accuracy table and a cost table with methods as rows and pairs as columns.
    Then the runs not counted (:func:`unfinished`) and those counted once (:func:`duplicate_runs`). CSV: the
    numbers, rounded."""
    if fmt not in FORMATS:
        raise KdbenchError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if by not in ("pair", "setting"):
        raise KdbenchError(f"unknown grouping {by!r}; valid groupings: pair, setting")
    if layout not in LAYOUTS[:2]:
        raise KdbenchError(f"unknown leaderboard layout {layout!r}; valid: {', '.join(LAYOUTS[:2])} (the regime "
                           f"checks read the runs: kdbench.report.report)")
    if fmt == "csv":
        return paper_csv(board) if layout == "paper" else rounded(board).to_csv(index=False)
    blocks = _leaderboard(board, fmt, by) if layout == "leaderboard" else paper_tables(board, fmt)
    at = 1 if layout == "leaderboard" else 0  # the leaderboard's first line states its rule
    blocks[at:at] = [paragraph(line, fmt) for line in teacher_warnings(board)]
    if not_finished is not None and len(not_finished):
        runs_ = f"{len(not_finished)} run{'s' if len(not_finished) > 1 else ''}"
        blocks.append(paragraph(f"Not counted ({runs_} did not finish): {describe(not_finished)}", fmt))
    if unreadable:
        runs_ = f"{len(unreadable)} run folder{'s' if len(unreadable) > 1 else ''}"
        blocks.append(paragraph(f"Not counted ({runs_} could not be read; `kdbench run` sets such files aside and "
                                f"makes the runs again): {'; '.join(unreadable)}", fmt))
    if duplicates is not None and len(duplicates):
        runs_ = f"{len(duplicates)} run{'s' if len(duplicates) > 1 else ''}"
        blocks.append(paragraph(f"Counted once ({runs_} in more than one results directory, read from the first): "
                                + "; ".join(f"{r.run_id} ({r.results_dir}; also in {r.also_in})"
                                            for r in duplicates.itertuples()), fmt))
    return "\n\n".join(blocks) + "\n"
