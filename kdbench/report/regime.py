"""Whether a table's regime can carry a ranking (``kdbench report --layout regime``).

A KD leaderboard is worth reading only where distillation has something to give and the students are done learning:
the teacher clearly above the CE-trained student, CE seeds that agree, students whose selected epoch is hardly
better than their last (they converged), and accuracy on the whole test set. kdbench's CPU reference set is held to
the criteria below (docs/reference-results.md, "The CPU benchmark"); this module measures them on any results, per
table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from kdbench.report.formats import escape, number, paragraph, table
from kdbench.report.load import best_at_last


@dataclass(frozen=True)
class Criterion:
    column: str
    text: str  # what the criterion asks, for the table's notes
    bound: float
    at_least: bool  # the value must be >= bound (else <= bound)

    def met(self, value: float) -> bool | None:
        if math.isnan(value):
            return None
        return bool(value >= self.bound if self.at_least else value <= self.bound)


CRITERIA = (
    Criterion("teacher_minus_ce", "teacher at least 10 points above the mean CE student", 10.0, True),
    Criterion("ce_std", "CE student's sample std over seeds at most 2.0 points", 2.0, False),
    Criterion("ce_best_minus_last", "CE student's mean best-minus-last-epoch gap at most 1.0 point", 1.0, False),
    Criterion("kd_best_minus_last", "KD's mean best-minus-last-epoch gap at most 1.0 point", 1.0, False),
    Criterion("subset_runs", "every run evaluated on the whole test set (no test subset)", 0, False),
)


def _mean_gap(runs: pd.DataFrame) -> float:
    """The mean over runs of (best test epoch − last epoch): how much a run was still moving when it stopped."""
    return float((runs["top1_best"] - runs["top1_last"]).mean()) if len(runs) else math.nan


def regime(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per table (setting, protocol, pair) of :func:`kdbench.report.entries`: the teacher's ``metric``
    (``top1_best`` where a teacher lacks it), the CE student's mean, std and n, their gap, the mean best-minus-last
    gaps of the CE and KD runs, how many of those were best at their last epoch and their last rise, the fewest
    test images any run was evaluated on, and whether each criterion holds
    (None where it cannot be measured, e.g. no KD runs)."""
    rows = []
    for (setting, protocol, pair), runs in frame.groupby(["setting", "protocol", "pair"], sort=False):
        teachers = runs[runs["kind"] == "teacher"]
        teacher = teachers[metric].fillna(teachers["top1_best"]).mean()
        ce = runs[runs["kind"] == "student"]
        kd = runs[(runs["kind"] == "method") & (runs["method"] == "kd")]
        at_last, ce_kd_runs, rise = best_at_last(pd.concat([ce, kd]))
        row = {"setting": setting, "protocol": protocol, "pair": pair, "metric": metric, "teacher": teacher,
               "ce_mean": ce[metric].mean(), "ce_std": ce[metric].std(ddof=1), "ce_n": len(ce),
               "teacher_minus_ce": teacher - ce[metric].mean(), "ce_best_minus_last": _mean_gap(ce),
               "kd_best_minus_last": _mean_gap(kd), "kd_n": len(kd), "test_images": runs["test_images"].min(),
               "subset_runs": float(runs["test_subset"].notna().sum()),
               # a gap of 0 also comes from runs still rising at their last epoch (not converged): how many were,
               # and by how much their last evaluation beat the one before (a plateau's noise, or a steep rise)
               "best_at_last": at_last, "best_at_last_rise": rise, "ce_kd_runs": ce_kd_runs}
        row.update({f"meets_{c.column}": c.met(row[c.column]) for c in CRITERIA})
        rows.append(row)
    return pd.DataFrame(rows)


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "yes" if met else "NO"


def render_regime(checks: pd.DataFrame, fmt: str) -> list[str]:
    """The checks as one table per setting and protocol, a row per pair, with the criteria in the notes."""
    blocks = [paragraph(f"Regime checks on {checks['metric'].iloc[0]} (a ranking needs every criterion met; n/a: "
                        f"not measurable, e.g. no KD run). Criteria: "
                        + "; ".join(c.text for c in CRITERIA) + ". A best-minus-last gap near 0 also comes from runs "
                        "still rising at their last epoch: the table counts them, with the mean rise of their last "
                        "evaluation over the one before.", fmt)]
    headers = ["pair", "teacher %", "CE % (n)", "teacher − CE", "CE std", "CE best − last", "KD best − last (n)",
               "test images", "CE/KD runs best at their last epoch (last rise)", "met"]
    for (setting, protocol), group in checks.groupby(["setting", "protocol"], sort=False):
        cells = [[escape(r.pair, fmt), number(r.teacher), f"{number(r.ce_mean)} ({r.ce_n})",
                  f"{number(r.teacher_minus_ce)} {_verdict(r.meets_teacher_minus_ce)}",
                  f"{number(r.ce_std)} {_verdict(r.meets_ce_std)}",
                  f"{number(r.ce_best_minus_last)} {_verdict(r.meets_ce_best_minus_last)}",
                  f"{number(r.kd_best_minus_last)} ({r.kd_n}) {_verdict(r.meets_kd_best_minus_last)}",
                  f"{r.test_images:,.0f} {_verdict(r.meets_subset_runs)}",
                  f"{r.best_at_last} of {r.ce_kd_runs}" + (f" ({r.best_at_last_rise:+.2f})" if r.best_at_last else ""),
                  "all" if all(getattr(r, f"meets_{c.column}") for c in CRITERIA) else "no"]
                 for r in group.itertuples()]
        heading = f"{setting} · protocol {protocol}"
        blocks += [paragraph(heading, fmt, heading=True),
                   table(headers, cells, fmt, ["l", *"r" * (len(headers) - 1)],
                         caption=heading if fmt == "latex" else "")]
    return blocks
