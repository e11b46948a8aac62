"""Output formats: numbers as text, and a table (with caption, notes and an optional header row of column groups)
as GitHub or Markdown pipes, HTML, or LaTeX with booktabs that compiles in a plain ``article``."""

from __future__ import annotations

import html
import math
from typing import Sequence

import pandas as pd
from tabulate import tabulate

FORMATS = ("github", "markdown", "latex", "csv", "html")
# Decimals each leaderboard column keeps in CSV: accuracy to 0.01 points, throughput to 0.1 img/s, seconds to
# 0.1 s; p values to 0.0001; bytes and parameter counts are whole numbers (the tidy Parquet keeps full precision).
_CSV_DECIMALS = {**dict.fromkeys(("mean", "std", "delta", "delta_std", "delta_ci_low", "delta_ci_high"), 2),
                 "p": 4, "p_adjusted": 4,
                 "train_images_per_s": 1, "end_to_end_s": 1, "peak_bytes": 0, "extra_params_train": 0,
                 "inference_params": 0}


_TABLEFMT = {"github": "github", "markdown": "pipe", "html": "unsafehtml"}
# Characters of kdbench's labels and notes that LaTeX's text mode does not take as they are.
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
          "†": r"$^\dagger$", "·": r"$\cdot$", "−": r"$-$", "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$",
          "<": r"$<$", ">": r"$>$", "→": r"$\rightarrow$", "…": r"\ldots{}", "σ": r"$\sigma$", "β": r"$\beta$",
          "α": r"$\alpha$", "–": "--"}


def method_notes(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The method notes of a table's rows, in the order their rows are marked [1], [2] …, and a footnote per note
    naming the rows it concerns."""
    notes = [n for n in dict.fromkeys(frame["method_note"].fillna("")) if n]
    lines = [f"[{i}] {', '.join(dict.fromkeys(frame.loc[frame['method_note'] == n, 'label']))}: {n}"
             for i, n in enumerate(notes, 1)]
    return notes, lines


def teacher_notes(board: pd.DataFrame) -> list[str]:
    """A line per teacher trained in another setting than its table's (under its own recipe), naming what differs."""
    if "trained_in" not in board:
        return []
    own = board[board["kind"].eq("teacher") & board["trained_in"].notna()].drop_duplicates(["arch", "trained_in"])
    return [f"teacher {r.arch}: trained under "
            f"{' · '.join(p for p in r.trained_in.split(' · ') if p not in r.setting.split(' · '))}"
            for r in own.itertuples()]


def number(value: float | None, digits: int = 2) -> str:
    """``value`` with thousands separators and ``digits`` decimals; empty for a missing value."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def count(value: float) -> str:
    """A parameter count as 272.19 k, 3.92 M."""
    if pd.isna(value):
        return ""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def duration(seconds: float) -> str:
    if pd.isna(seconds):
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.2f} h"


def mean_std(mean: float, std: float, signed: bool = False) -> str:
    if pd.isna(mean):
        return ""
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if pd.notna(std) else "")


def escape(text: str, fmt: str) -> str:
    """``text`` as literal text of ``fmt`` (pair arrows ``->`` read as →)."""
    if fmt == "latex":
        return "".join(_LATEX.get(ch, ch) for ch in text.replace("->", "→"))
    return html.escape(text) if fmt == "html" else text


def bold(text: str, fmt: str) -> str:
    """Already escaped ``text`` in bold."""
    if not text:
        return text
    return {"latex": f"\\textbf{{{text}}}", "html": f"<b>{text}</b>"}.get(fmt, f"**{text}**")


def paragraph(text: str, fmt: str, heading: bool = False) -> str:
    if fmt == "html":
        return f"<h3>{html.escape(text)}</h3>" if heading else f"<p>{html.escape(text)}</p>"
    if fmt == "latex":
        return "% " + text  # outside a table: a comment, so the output pastes into a document as it is
    return f"### {text}" if heading else text


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], fmt: str, align: Sequence[str],
          caption: str = "", notes: Sequence[str] = (), rules_after: Sequence[int] = (),
          sections: dict[int, str] | None = None) -> str:
    """One table. ``rows`` hold text already escaped for ``fmt`` (so cells may carry markup such as bold);
    ``headers``, ``caption`` and ``notes`` are plain text. ``align``: "l" or "r" per column. ``rules_after``: row
    indices followed by a rule (LaTeX). ``sections``: a plain-text title set before the row of each index, across
    the table in LaTeX, in the first column elsewhere."""
    headers = list(headers)
    sections = sections or {}
    if fmt == "latex":
        return _latex(headers, rows, align, caption, notes, rules_after, sections)
    rows = [line for index, row in enumerate(rows)
            for line in ([[escape(sections[index], fmt), *[""] * (len(headers) - 1)]] if index in sections else [])
            + [list(row)]]
    body = tabulate([list(r) for r in rows], headers=[escape(h, fmt) for h in headers], tablefmt=_TABLEFMT[fmt],
                    disable_numparse=True, colalign=["left" if a == "l" else "right" for a in align])
    return "\n\n".join([*([paragraph(caption, fmt)] if caption else []), body, *(paragraph(n, fmt) for n in notes)])


def _latex(headers: list[str], rows: Sequence[Sequence[str]], align: Sequence[str], caption: str,
           notes: Sequence[str], rules_after: Sequence[int], sections: dict[int, str]) -> str:
    lines = [r"\begin{table}[htbp]", r"\centering", r"\small"]
    if caption:
        lines.append(f"\\caption{{{escape(caption, 'latex')}}}")
    lines += [f"\\begin{{tabular}}{{{''.join(align)}}}", r"\toprule"]
    lines += [" & ".join(escape(h, "latex") for h in headers) + r" \\", r"\midrule"]
    for index, row in enumerate(rows):
        if index in sections:
            lines.append(f"\\multicolumn{{{len(headers)}}}{{l}}{{\\emph{{{escape(sections[index], 'latex')}}}}} \\\\")
        lines.append(" & ".join(row) + r" \\")
        if index in rules_after and index < len(rows) - 1:
            lines.append(r"\midrule")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    if notes:
        lines += [r"\par\smallskip\footnotesize", *(escape(n, "latex") + r"\par" for n in notes)]
    lines.append(r"\end{table}")
    return "\n".join(lines)


def rounded(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard's numbers rounded to what they can tell (_CSV_DECIMALS)."""
    out = board.copy()
    for column, decimals in _CSV_DECIMALS.items():
        if column in out.columns:
            out[column] = out[column].round(decimals)
            if decimals == 0:
                out[column] = out[column].astype("Int64")
    return out
