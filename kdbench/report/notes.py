"""Footnotes that the leaderboard and the paper layout share: what * means under the table's correction, the
end-to-end cost rule, devices pooled in one table, and teachers shown under another metric."""

from __future__ import annotations

from typing import Any

import pandas as pd

from kdbench.report.aggregate import CORRECTIONS, SIGNIFICANCE
from kdbench.report.load import device_names

SIGNIFICANT = "*"  # marks a Δ whose adjusted p is below SIGNIFICANCE


def row_name(r: Any) -> str:
    """A leaderboard row's name: the method's label, or teacher/student and the architecture (a teacher with its
    seed)."""
    if r.kind == "method":
        return r.label
    if r.kind == "student":
        return f"student {r.arch} (CE)"
    return f"teacher {r.arch} " + (r.label[r.label.index("("):] if "(" in r.label else f"(seed {r.seeds})")


def p_header(correction: str) -> str:
    return "p" if correction == "none" else f"p ({'BH' if correction == 'bh' else CORRECTIONS[correction]})"


def p_value(p: float) -> str:
    return "" if pd.isna(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def significance_note(board: pd.DataFrame) -> str:
    """What * means in one table: the correction and the number of methods it adjusts over (per pair where the table
    holds several)."""
    tested, correction = board.groupby("pair", sort=False)["p"].count(), board["correction"].iloc[0]
    over = (f"the {tested.iloc[0]} method{'s' * bool(tested.iloc[0] != 1)} of this table" if len(tested) == 1 else
            f"the methods of each pair ({tested.min()} to {tested.max()})")
    return (f"{SIGNIFICANT} Δ over the CE student with {CORRECTIONS[correction]}-adjusted p < {SIGNIFICANCE:g} over "
            f"{over} with a paired test (two-sided paired t-test of the per-seed Δ, n ≥ 2).")


def priced_in_sitting(sittings) -> str:
    """Where sitting-priced figures come from, as notes and plot captions say it."""
    return f"priced in one sitting (kdbench costs; {'; '.join(sittings)})"


def cost_note(board: pd.DataFrame) -> str:
    """The end-to-end cost rule, as the caption or footnote of a table states it, and where its times come from."""
    full = board[board["assistants_in_full"]]
    sittings = board["cost_sitting"].replace("", None).dropna().unique()
    mixed = [row_name(r) for r in board[board["cost_sitting"] == ""].itertuples()] if len(sittings) else []
    source = (f" Train img/s and end-to-end: {priced_in_sitting(sittings)}, each "
              f"setting's steady step times its recipe, not the runs' own timings, which the machine and load of "
              f"each session set" + (f"; from the runs' own timings: {', '.join(mixed)}" if mixed else "") + "."
              if len(sittings) else "")
    return ("end-to-end: the run's wall time, preparation and reused fitting, plus its share of the teacher's and "
            "teacher assistants' training (their wall time over the number of finished runs of the results that "
            "learned from them); a teacher's row shows its full training"
            + (f"; {', '.join(map(row_name, full.itertuples()))}: assistants charged in full, as their runs are "
               f"not in these results or the table predates assistant_runs" if len(full) else "") + "." + source)


def device_note(board: pd.DataFrame) -> str:
    """Why throughput and memory cells name device models: the table pools runs on several (empty otherwise)."""
    if not board["train_images_per_s_per_device"].ne("").any():
        return ""
    return (f"train img/s and peak MiB per device: this table pools runs that differ only in device model, in how "
            f"many runs shared a GPU or in processes per run ({', '.join(device_names(board))}), whose speed and "
            f"memory differ.")


def metric_notes(board: pd.DataFrame) -> list[str]:
    """A line per teacher whose row shows another metric than the table's (imported checkpoints: no validation)."""
    return [f"{row_name(r)}: {r.metric_shown}, as it recorded no {r.metric} (an imported checkpoint has no "
            f"validation history)." for r in board[board["metric_shown"] != board["metric"]].itertuples()]
