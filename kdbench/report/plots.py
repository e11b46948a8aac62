"""Plots of one group of leaderboard entries (one setting and protocol), a panel per pair.

Each plot_* takes one group of entries (see ``groups``: one setting and protocol) and returns a Figure with a panel
per pair; ``setting`` (the group's title) goes under the headline, so a saved file says what it shows.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd

from kdbench.report.aggregate import CI_NAME, KIND_ORDER, differences, groups, interval
from kdbench.report.load import MEMORY_NAMES


def _palette(group: pd.DataFrame) -> dict[str, Any]:
    """One colour per row label, teacher and baseline first, the same in every plot of a group."""
    import seaborn as sns

    labels = list(dict.fromkeys(group.sort_values("kind", key=lambda k: k.map(KIND_ORDER), kind="stable")["label"]))
    return dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))))


def _figure(pairs: list[str], headline: str, setting: str, height: float, width: float = 5.5):
    import matplotlib.pyplot as plt

    cols = min(3, len(pairs))
    fig, axes = plt.subplots(math.ceil(len(pairs) / cols), cols, figsize=(width * cols, height * math.ceil(
        len(pairs) / cols) + 0.6), squeeze=False, layout="constrained")
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    _suptitle(fig, headline, setting)
    return fig, list(axes.flat)


def _suptitle(fig, headline: str, setting: str) -> None:
    """The headline, then the setting broken between its " · " parts to fit the figure's width."""
    chars = int(fig.get_figwidth() * 14)  # about 14 characters of 10-point text per inch
    lines = [textwrap.fill(headline, chars)]
    for part in setting.split(" · ") if setting else []:
        if len(lines) > 1 and len(lines[-1]) + 3 + len(part) <= chars:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    fig.suptitle("\n".join(lines), fontsize=10)


def _legend(fig, palette: dict[str, Any], line: bool = False) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=None if line else "o", linestyle="-" if line else "", label=lbl)
               for lbl, c in palette.items()]
    fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=9)


def plot_accuracy_vs_throughput(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Mean top-1 against training throughput (log x) per pair, error bars = sd over seeds; the Pareto front
    (nothing both faster and more accurate) is circled and joined by a dashed line."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    students = group[group["kind"] != "teacher"]
    palette = {k: v for k, v in _palette(group).items() if k in set(students["label"])}
    pairs = list(dict.fromkeys(students["pair"]))
    with sns.axes_style("whitegrid"):
        fig, axes = _figure(pairs, f"{metric} vs training throughput (Pareto front circled; error bars: sd over "
                                   f"seeds)", setting, 4.2)
        for ax, pair in zip(axes, pairs):
            stats = students[students["pair"] == pair].groupby("label").agg(
                x=("train_images_per_s", "mean"), xerr=("train_images_per_s", "std"),
                y=(metric, "mean"), yerr=(metric, "std")).dropna(subset=["x", "y"])
            for label, s in stats.iterrows():
                ax.errorbar(s.x, s.y, xerr=None if pd.isna(s.xerr) else s.xerr,
                            yerr=None if pd.isna(s.yerr) else s.yerr, fmt="o", color=palette[label], capsize=3)
            front, best = [], -math.inf
            for _, s in stats.sort_values("x", ascending=False).iterrows():
                if s.y > best:
                    front, best = front + [(s.x, s.y)], s.y
            if front:
                ax.plot(*zip(*sorted(front)), "--", color="0.35", linewidth=1, marker="o", markersize=15,
                        markerfacecolor="none", zorder=0)
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set(title=pair, xlabel="training throughput (img/s, log scale)", ylabel=f"{metric} (%)")
        _legend(fig, palette)
    plt.close(fig)
    return fig


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (800, 2k, not 10³), minor ones only where they do not crowd."""
    from matplotlib.ticker import FuncFormatter

    def plain(value: float, _=None) -> str:
        return f"{value / 1000:g}k" if value >= 1000 else f"{value:g}"

    def minor(value: float, _=None) -> str:
        low, high = sorted(axis.get_view_interval())  # read at draw time, after autoscaling
        decades = math.log10(high / low) if low > 0 else 3
        shown = range(1, 10) if decades < 0.4 else (2, 3, 5) if decades < 1 else (2, 5) if decades < 2 else ()
        return plain(value) if round(value / 10 ** math.floor(math.log10(value))) in shown else ""

    axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_formatter(FuncFormatter(minor))


def _horizontal(plot, group: pd.DataFrame, x: str, xlabel: str, headline: str, setting: str,
                hue: str | None = None, colours: dict[str, Any] | None = None,
                palette: dict[str, Any] | None = None, legend: bool = False, **kwargs):
    """One horizontal seaborn plot per pair, row labels on the y axis (long names stay readable). Colours:
    ``palette`` per row label, or ``colours`` per value of ``hue`` when another column is the hue (its
    ``legend`` goes right of the panels)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    pairs, palette = list(dict.fromkeys(group["pair"])), palette or _palette(group)
    height = 1.2 + 0.45 * max(group.groupby("pair")["label"].nunique())
    with sns.axes_style("whitegrid"):
        fig, axes = _figure(pairs, headline, setting, height)
        for ax, pair in zip(axes, pairs):
            data = group[group["pair"] == pair]
            options = {"hue": "label", "palette": palette} if hue is None else {"hue": hue, "palette": colours}
            plot(data=data, x=x, y="label", order=[lbl for lbl in palette if lbl in set(data["label"])], ax=ax,
                 legend=legend and ax is axes[0], **options, **kwargs)
            ax.set(title=pair, xlabel=xlabel, ylabel="")
        if legend:
            handles, labels = axes[0].get_legend_handles_labels()
            axes[0].get_legend().remove()
            fig.legend(handles, labels, loc="outside right center", frameon=False, fontsize=9)
    plt.close(fig)
    return fig, axes


def plot_top1(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Top-1 per method and pair: mean with error bars = sd over seeds (their spread; the uncertainty of a
    comparison is the Δ plot's interval); the teacher as a dashed line."""
    import seaborn as sns

    students = group[group["kind"] != "teacher"]
    fig, axes = _horizontal(sns.pointplot, students, metric, f"{metric} (%): mean, error bars ± sd over seeds",
                            f"{metric} per method", setting, palette=_palette(group), errorbar="sd",
                            linestyle="none", capsize=0.3)
    for ax, pair in zip(axes, dict.fromkeys(students["pair"])):
        teacher = group[(group["pair"] == pair) & (group["kind"] == "teacher")][metric].mean()
        if pd.notna(teacher):
            ax.axvline(teacher, color="0.3", linestyle="--", linewidth=1)
            ax.annotate(f"teacher {teacher:.1f}", (teacher, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(-3, -3), textcoords="offset points", ha="right", va="top", fontsize=8)
    return fig


def _seed_deltas(group: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The differences behind each leaderboard Δ (see :func:`differences`), one row each."""
    parts = []
    for pair, table in group.groupby("pair", sort=False):
        baseline = table[table["kind"] == "student"]
        for (arch, label), rows in table[table["kind"] == "method"].groupby(["arch", "label"], sort=False):
            diff, _ = differences(rows, baseline[baseline["arch"] == arch], metric)
            parts.append(pd.DataFrame({"pair": pair, "kind": "method", "label": label, "delta": diff.to_numpy()}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_delta(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Δ top-1 over the CE student per method and pair, paired by seed: diverging bars (green better, red
    worse), error bars = the leaderboard's confidence interval. None when no pair has a baseline."""
    import seaborn as sns

    deltas = _seed_deltas(group, metric)
    if deltas.empty:
        return None
    better = deltas.groupby(["pair", "label"])["delta"].transform("mean") >= 0
    deltas["direction"] = better.map({True: "better", False: "worse"})
    fig, axes = _horizontal(sns.barplot, deltas, "delta",
                            f"Δ {metric} vs student (points): mean, error bars {CI_NAME} CI of the paired Δ",
                            f"Δ {metric} over the CE-trained student", setting, hue="direction",
                            colours={"better": "#2a9d8f", "worse": "#e76f51"}, errorbar=interval, capsize=0.2)
    for ax in axes:
        ax.axvline(0, color="0.2", linewidth=1)
    return fig


def plot_memory(group: pd.DataFrame, setting: str = ""):
    """Peak memory per method and pair (CUDA max allocated and reserved, or CPU peak RSS), sd over seeds."""
    import seaborn as sns

    present = [k for k in ("peak_alloc_bytes", "peak_reserved_bytes", "cpu_peak_rss_bytes")
               if k in group.columns and group[k].notna().any()]
    data = group.melt(id_vars=["pair", "label", "kind", "seed"], value_vars=present, var_name="measure",
                      value_name="bytes").dropna(subset=["bytes"])
    data["MiB"] = data["bytes"] / 2**20
    data["measure"] = data["measure"].map(MEMORY_NAMES)
    xlabel = "peak memory" if len(present) > 1 else data["measure"].iloc[0]
    fig, _ = _horizontal(sns.barplot, data, "MiB", f"{xlabel} (MiB), mean ± sd over seeds",
                            "peak memory per method", setting, hue="measure" if len(present) > 1 else None,
                            legend=len(present) > 1, errorbar="sd", capsize=0.2)
    return fig


def plot_learning_curves(group: pd.DataFrame, table: pd.DataFrame, setting: str = ""):
    """Test top-1 by epoch per method and pair, band = sd over seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    curves = table[(table["metric"] == "top1") & table["epoch"].notna()][["run_id", "epoch", "value"]]
    data = group[["run_id", "pair", "label", "kind"]].merge(curves, on="run_id").astype({"epoch": int})
    palette, pairs = _palette(group), list(dict.fromkeys(data["pair"]))
    with sns.axes_style("whitegrid"):
        fig, axes = _figure(pairs, "test top-1 by epoch (band: sd over seeds)", setting, 4.0)
        for ax, pair in zip(axes, pairs):
            sns.lineplot(data=data[data["pair"] == pair], x="epoch", y="value", hue="label", palette=palette,
                         errorbar="sd", err_kws={"alpha": 0.12}, linewidth=1.3, ax=ax, legend=False,
                         marker="o" if data["epoch"].max() <= 20 else None, markersize=4)
            ax.set(title=pair, xlabel="epoch", ylabel="test top-1 (%)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        _legend(fig, {lbl: c for lbl, c in palette.items() if lbl in set(data["label"])}, line=True)
    plt.close(fig)
    return fig


def plot_heatmap(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Mean top-1 per method (rows) and pair (columns), annotated: the paper-table view. The colour scale
    spans the students, so a far better teacher does not flatten their differences (its cells saturate)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = group.pivot_table(index="label", columns="pair", values=metric, aggfunc="mean", sort=False)
    grid = grid.reindex([lbl for lbl in _palette(group) if lbl in grid.index])
    fig, ax = plt.subplots(figsize=(max(6.0, 3.0 + 1.6 * grid.shape[1]), 2.4 + 0.5 * grid.shape[0]),
                           layout="constrained")
    students = grid.drop(index=[lbl for lbl in grid.index if lbl.startswith("teacher")])
    scale = students if students.notna().any().any() else grid  # the teacher saturates the scale's top
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", linewidths=0.5, ax=ax, vmin=scale.min().min(),
                vmax=scale.max().max(), cbar_kws={"label": f"mean {metric} (%)"})
    ax.set(xlabel="", ylabel="")
    ax.tick_params(axis="y", labelrotation=0)
    ax.tick_params(axis="x", labelrotation=20 if grid.shape[1] > 3 else 0)
    _suptitle(fig, f"mean {metric} per method and pair", setting)
    plt.close(fig)
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:100]


def save_plots(frame: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path, metric: str = "top1_best") -> list[Path]:
    """Every plot, as PNG and SVG, into ``out_dir/<setting-and-protocol>/``; returns the files written."""
    out_dir, written = Path(out_dir), []
    for title, group in groups(frame):
        folder = out_dir / _slug(title)
        folder.mkdir(parents=True, exist_ok=True)
        figures = {"accuracy_vs_throughput": plot_accuracy_vs_throughput(group, metric, title),
                   "top1": plot_top1(group, metric, title), "delta": plot_delta(group, metric, title),
                   "memory": plot_memory(group, title), "learning_curves": plot_learning_curves(group, table, title),
                   "heatmap": plot_heatmap(group, metric, title)}
        for name, fig in figures.items():
            for suffix in (".png", ".svg"):
                if fig is not None:
                    fig.savefig(folder / f"{name}{suffix}", dpi=150)
                    written.append(folder / f"{name}{suffix}")
    return written
