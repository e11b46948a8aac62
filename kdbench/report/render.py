"""Rendering: leaderboards and per-run summaries as text (GitHub, Markdown, LaTeX, HTML) and CSV."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import pandas as pd
from tabulate import tabulate

from kdbench.errors import KdbenchError
from kdbench.report.aggregate import CE_ONLY, CI_NAME, RULE_OF_METRIC, groups
from kdbench.report.load import MEMORY_NAMES, PUBLISHED_NAME, describe

if TYPE_CHECKING:  # kdbench.results imports torch: the CLI imports this package for its choices
    from kdbench.results import RunRecord

FORMATS = ("github", "markdown", "latex", "csv", "html")
EXCLUDES_ZERO = "*"  # marks a Δ whose interval excludes zero
OTHER_CODE = "†"  # marks a row made by other code than the rest of its table
_TABLEFMT = {"github": "github", "markdown": "pipe", "latex": "latex", "html": "html"}
_MEMORY_KEYS = ("peak_alloc_bytes", "cpu_peak_rss_bytes")


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
            f"± sample std of the per-seed differences, and their {CI_NAME} confidence interval (t distribution, "
            f"n − 1 degrees of freedom, over the seeds both ran; n/a below two), marked {EXCLUDES_ZERO} when it "
            f"excludes zero. "
            f"Runs of different datasets, recipes, protocols, devices or precisions are never pooled: one table "
            f"each. Published numbers are marked [rule] when their reporting rule is not {RULE_OF_METRIC[metric]}.")


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
        row.update({"Δ vs student": delta, f"Δ {CI_NAME} CI": ci} if distilled else {})
        row.update({"train img/s": _fmt(r.train_images_per_s, 1),
                    memory_header: _fmt(r.peak_bytes / 2**20 if pd.notna(r.peak_bytes) else None, 0),
                    "extra train params": _count(r.extra_params_train), "inference params": _count(r.inference_params),
                    "end-to-end": _duration(r.end_to_end_s)})
        if show_published:
            row.update({"published %": r.published, "published source": r.published_source})
        rows.append(row)
    footnotes = [f"[{i}] {', '.join(board.loc[board['method_note'] == n, 'label'])}: {n}"
                 for i, n in enumerate(notes, 1)]
    memory_name = MEMORY_NAMES[memory.iloc[0]] if len(memory) else "not measured"
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
        blocks.append(_text(f"Not counted ({runs_} did not finish): {describe(not_finished)}", fmt))
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
