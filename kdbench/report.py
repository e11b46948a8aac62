"""Human-readable views of results (the leaderboard grows here; issue 7)."""

from __future__ import annotations

import math

from tabulate import tabulate

from kdbench.results import RunRecord

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
