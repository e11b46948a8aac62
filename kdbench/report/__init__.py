"""Human-readable views of results: the per-run summary, leaderboards, paired comparisons and plots.

Everything here except :func:`run_summary` reads only tidy results rows (each run folder's ``metrics.parquet``, or
a results directory's all-runs table when it has no run folders; see ``kdbench.results`` and ``load``) and the
published CIFAR-100 table (``results/published_cifar100.csv``). One module per job:
:mod:`~kdbench.report.load` reads, :mod:`~kdbench.report.aggregate` turns runs into leaderboard rows and statistics,
:mod:`~kdbench.report.render` writes them as text (with :mod:`~kdbench.report.notes`, the footnotes both
layouts share), :mod:`~kdbench.report.plots` draws them.

Pipeline: :func:`load_results` → :func:`entries` (one row per run and table it appears in) → :func:`leaderboard`
(one row per table row) → :func:`add_flags` → :func:`render_report`; :func:`flagged_figures` for figures (or
:func:`plot_groups` and the ``plot_*`` functions one by one, without the flags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from kdbench.report.aggregate import (
    CE_ONLY,
    CI_LEVEL,
    CORRECTIONS,
    METRIC_RULES,
    METRICS,
    SIGNIFICANCE,
    adjust,
    default_metric,
    entries,
    groups,
    leaderboard,
    mean_ranks,
    paired_comparison,
)
from kdbench.report.flags import add_flags
from kdbench.report.formats import FORMATS
from kdbench.report.load import describe, duplicate_runs, load_results, pooled_processes, runs, unfinished
from kdbench.report.plots import (
    flagged_figures,
    plot_accuracy_vs_throughput,
    plot_delta,
    plot_groups,
    plot_heatmap,
    plot_learning_curves,
    plot_memory,
    plot_top1,
    save_plots,
)
from kdbench.report.published import load_published, published_paths
from kdbench.report.regime import CRITERIA, regime, render_regime
from kdbench.report.render import LAYOUTS, OTHER_CODE, SIGNIFICANT, render_report, run_summary

__all__ = ["CE_ONLY", "CI_LEVEL", "CORRECTIONS", "CRITERIA", "FORMATS", "LAYOUTS", "METRICS", "METRIC_RULES",
           "OTHER_CODE", "SIGNIFICANCE", "SIGNIFICANT", "add_flags", "adjust", "default_metric", "describe",
           "duplicate_runs", "entries", "flagged_figures", "groups", "leaderboard", "load_published",
           "load_results", "mean_ranks", "paired_comparison", "plot_accuracy_vs_throughput", "plot_delta",
           "plot_groups", "plot_heatmap", "plot_learning_curves", "plot_memory", "plot_top1", "pooled_processes",
           "published_paths", "regime", "render_regime", "render_report", "report", "run_summary", "runs",
           "save_plots", "unfinished"]


def report(results_dirs: str | Path | Iterable[str | Path], fmt: str = "github", metric: str | None = None,
           by: str = "pair", published: str | Path | None = None, plots: str | Path | None = None,
           layout: str = "leaderboard", correction: str = "holm", pool_processes: bool = False,
           **filters: str | None) -> tuple[str, list[Path]]:
    """``kdbench report``: the leaderboard text and the plot files written (when ``plots`` names a folder). The
    published table is looked for in the first results directory. ``metric`` None: :func:`default_metric`.
    ``pool_processes``: :func:`pooled_processes`."""
    table = load_results(results_dirs)
    if pool_processes:
        table = pooled_processes(table)
    frame = entries(table, **filters)
    paths = published_paths(table["results_dir"].iloc[0], published)
    board = add_flags(leaderboard(frame, metric, load_published(paths) if paths else None, correction), frame,
                      table)
    if layout == "regime":
        checks = regime(frame, board["metric"].iloc[0])
        text = checks.to_csv(index=False) if fmt == "csv" else "\n\n".join(render_regime(checks, fmt)) + "\n"
    else:
        text = render_report(board, fmt, by, layout, unfinished(table), duplicate_runs(table),
                             table.attrs.get("unreadable"))
    return text, save_plots(frame, table, plots, board["metric"].iloc[0], correction) if plots else []
