"""Plots of one group of leaderboard entries (one setting and protocol), a panel per pair.

Each plot_* takes one group of entries (see ``groups``: one setting and protocol) and returns a Figure; ``setting``
(the group's title) goes under the headline, so a saved file says what it shows. Colours and markers come from
:mod:`kdbench.report.style` (a hue per method family), so they stay apart at 25 methods.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from kdbench.report.aggregate import CI_NAME, CORRECTIONS, SIGNIFICANCE, differences, groups, interval, leaderboard
from kdbench.report.flags import caption, for_plots, row_flags
from kdbench.report.load import MEMORY_NAMES
from kdbench.report.notes import priced_in_sitting
from kdbench.report.style import FAMILY_COLOURS, colours, figure, legend, styles, suptitle


def _pairs(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["pair"]))


def plot_accuracy_vs_throughput(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Mean top-1 against training throughput (log x) per pair, error bars = sd over seeds, marker area
    proportional to the deployed model's parameters (``inference_params``: letKD's KD layer ships with its
    student); the Pareto front in (throughput, top-1) is joined by a dashed line. Runs of one device only (the most
    common; a shared GPU counts as another device: kdbench.report.load)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    students = group[group["kind"] != "teacher"]
    # img/s of different device models, or of a GPU shared by several runs, are not one axis: the runs of the most
    # common device only, the others said
    devices = students["device_name"].fillna("unknown device")
    shown = devices.mode().iloc[0] if len(devices) else ""
    left_out = int((devices != shown).sum())
    students = students[devices == shown]
    style = {k: v for k, v in styles(group).items() if k in set(students["label"])}
    pairs = _pairs(students)
    with sns.axes_style("whitegrid"):
        fig, axes = figure(pairs, f"{metric} vs training throughput (error bars: sd over seeds; marker area ∝ "
                                  f"deployed parameters, per pair; dashed: Pareto front)"
                                  + (f"; runs on {shown} only, {left_out} on other devices left out" if left_out
                                     else ""), setting, 4.4)
        for ax, pair in zip(axes, pairs):
            stats = students[students["pair"] == pair].groupby("label").agg(
                x=("train_images_per_s", "mean"), xerr=("train_images_per_s", "std"),
                y=(metric, "mean"), yerr=(metric, "std"), params=("inference_params", "mean")).dropna(
                subset=["x", "y"])
            largest = stats["params"].max()  # per pair: the students of a pair are what is compared
            for label, s in stats.iterrows():
                ax.errorbar(s.x, s.y, xerr=None if pd.isna(s.xerr) else s.xerr,
                            yerr=None if pd.isna(s.yerr) else s.yerr, fmt="none", ecolor=style[label].colour,
                            capsize=2, linewidth=0.8)
                area = 25 + 275 * (s.params / largest if largest and pd.notna(s.params) else 0)
                ax.scatter(s.x, s.y, s=area, color=style[label].colour, marker=style[label].marker,
                           edgecolor="0.2", linewidth=0.5, zorder=3)
            front, best = [], -math.inf
            for _, s in stats.sort_values("x", ascending=False).iterrows():
                if s.y > best:
                    front, best = front + [(s.x, s.y)], s.y
            if front:
                ax.plot(*zip(*sorted(front)), "--", color="0.35", linewidth=1, zorder=1)
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set(title=pair, xlabel="training throughput (img/s, log scale)", ylabel=f"{metric} (%)")
        legend(fig, style)
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


def _horizontal(plot, group: pd.DataFrame, x: str, xlabel: str, headline: str, setting: str, order: list[str],
                hue: str, palette: dict[str, Any], legend_title: str | None = None, **kwargs):
    """One horizontal seaborn plot per pair, row labels on the y axis in ``order`` (long names stay readable);
    ``hue`` coloured by ``palette``, with a legend right of the panels when ``legend_title`` is given."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    pairs = _pairs(group)
    height = 1.2 + 0.32 * max(group.groupby("pair")["label"].nunique())
    with sns.axes_style("whitegrid"):
        fig, axes = figure(pairs, headline, setting, height)
        for ax, pair in zip(axes, pairs):
            data = group[group["pair"] == pair]
            plot(data=data, x=x, y="label", order=[lbl for lbl in order if lbl in set(data["label"])], ax=ax,
                 hue=hue, palette=palette, legend=legend_title is not None and ax is axes[0], **kwargs)
            ax.set(title=pair, xlabel=xlabel, ylabel="")
            ax.tick_params(axis="y", labelsize=8)
        if legend_title is not None:
            handles, labels = axes[0].get_legend_handles_labels()
            axes[0].get_legend().remove()
            fig.legend(handles, labels, loc="outside right center", frameon=False, fontsize=9, title=legend_title)
    plt.close(fig)
    return fig, axes


def plot_top1(group: pd.DataFrame, metric: str = "top1_best", setting: str = ""):
    """Top-1 per method and pair: mean with error bars = sd over seeds (their spread; the uncertainty of a
    comparison is the Δ plot's interval); each teacher run as a dashed line (never their mean). Rows in legend order
    (by family)."""
    import seaborn as sns

    students = group[group["kind"] != "teacher"]
    style = styles(group)
    shown = [lbl for lbl in style if lbl in set(students["label"])]  # markers are handed out in hue order
    fig, axes = _horizontal(sns.pointplot, students, metric, f"{metric} (%): mean, error bars ± sd over seeds",
                            f"{metric} per method", setting, order=list(style), hue="label", hue_order=shown,
                            palette=colours(group), errorbar="sd", linestyle="none", capsize=0.3,
                            markers=[style[lbl].marker for lbl in shown])
    for ax, pair in zip(axes, _pairs(students)):
        teachers = group[(group["pair"] == pair) & (group["kind"] == "teacher")].dropna(subset=[metric])
        for teacher in teachers.itertuples():
            value, seed = getattr(teacher, metric), f" (seed {teacher.seed})" if len(teachers) > 1 else ""
            ax.axvline(value, color="0.3", linestyle="--", linewidth=1)
            ax.annotate(f"teacher{seed} {value:.1f}", (value, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(-3, -3), textcoords="offset points", ha="right", va="top", fontsize=8)
    return fig


def seed_deltas(group: pd.DataFrame, metric: str) -> pd.DataFrame:
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

    deltas = seed_deltas(group, metric)
    if deltas.empty:
        return None
    better = deltas.groupby(["pair", "label"])["delta"].transform("mean") >= 0
    deltas["direction"] = better.map({True: "better", False: "worse"})
    fig, axes = _horizontal(sns.barplot, deltas, "delta",
                            f"Δ {metric} vs student (points): mean, error bars {CI_NAME} CI of the paired Δ",
                            f"Δ {metric} over the CE-trained student", setting, order=list(styles(group)),
                            hue="direction", palette={"better": "#2a9d8f", "worse": "#e76f51"},
                            legend_title="mean Δ", errorbar=interval, capsize=0.2)
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
    several = len(present) > 1
    xlabel = "peak memory" if several else data["measure"].iloc[0]
    fig, _ = _horizontal(sns.barplot, data, "MiB", f"{xlabel} (MiB), mean ± sd over seeds", "peak memory per method",
                         setting, order=list(styles(group)), hue="measure" if several else "label",
                         palette=(dict(zip(MEMORY_NAMES.values(), ("#4c72b0", "#a1c9f4", "#dd8452"))) if several
                                  else colours(group)),
                         legend_title="measure" if several else None, errorbar="sd", capsize=0.2)
    return fig


def plot_learning_curves(group: pd.DataFrame, table: pd.DataFrame, setting: str = ""):
    """Test top-1 by epoch as small multiples: a row per pair, a panel per method family, the CE student (grey)
    in every panel; band = sd over seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    # the recipe's epochs: an init stage (AB, FT, FSP; epochs <= 0) trains features, not the classifier
    curves = table[(table["metric"] == "top1") & (table["epoch"] >= 1)][["run_id", "epoch", "value"]]
    data = group[["run_id", "pair", "label", "kind"]].merge(curves, on="run_id").astype({"epoch": int})
    style = styles(group)
    data["family"] = data["label"].map(lambda lbl: style[lbl].family)
    families = [f for f in FAMILY_COLOURS if f in set(data["family"])]
    pairs = _pairs(data)
    panels = [(pair, family) for pair in pairs for family in families] or [(pair, None) for pair in pairs]
    with sns.axes_style("whitegrid"):
        fig, axes = figure([f"{p} · {f}" for p, f in panels], "test top-1 by epoch, a panel per method family "
                           "(grey: CE student; band: sd over seeds)", setting, 3.0, width=3.6,
                           cols=max(1, len(families)))
        for ax, (pair, family) in zip(axes, panels):
            shown = data[(data["pair"] == pair) & (data["family"].isin({family, "CE student"}))]
            few = data["epoch"].max() <= 20  # markers on every epoch only while they do not crowd
            sns.lineplot(data=shown, x="epoch", y="value", hue="label", palette=colours(group), errorbar="sd",
                         err_kws={"alpha": 0.12}, linewidth=1.2, ax=ax, legend=False, style="label", dashes=False,
                         markers={lbl: style[lbl].marker for lbl in set(shown["label"])} if few else False,
                         markersize=4)
            ax.set(title=f"{pair} · {family}" if family else pair, xlabel="epoch", ylabel="test top-1 (%)")
            ax.title.set_fontsize(9)
            ax.xaxis.get_major_locator().set_params(integer=True)
        drawn = set(data.loc[data["family"] != "teacher", "label"])  # teachers train with a recipe of their own
        legend(fig, {lbl: s for lbl, s in style.items() if lbl in drawn}, line=True)
    plt.close(fig)
    return fig


def plot_heatmap(group: pd.DataFrame, metric: str = "top1_best", setting: str = "", correction: str = "holm"):
    """Mean Δ top-1 over the CE student per method (rows) and pair (panels), annotated, on a diverging scale
    centred at 0 and symmetric per pair, so colour shows the gain within each pair, not the pair; * marks a Δ
    that the leaderboard marks (adjusted p < SIGNIFICANCE under ``correction``); rules separate method families.
    None when no pair has a baseline."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    deltas = seed_deltas(group, metric)
    if deltas.empty:
        return None
    style = styles(group)
    order = [lbl for lbl in style if lbl in set(deltas["label"])]
    significant = leaderboard(group, metric, correction=correction).set_index(["pair", "label"])["delta_significant"]
    # a rule between method families
    rules = [i for i in range(1, len(order)) if style[order[i]].family != style[order[i - 1]].family]
    pairs = _pairs(deltas)
    fig, axes = plt.subplots(1, len(pairs), figsize=(2.2 + 2.3 * len(pairs), 1.6 + 0.3 * len(order)),
                             squeeze=False, layout="constrained", sharey=True)
    for ax, pair in zip(axes.flat, pairs):
        by_label = deltas[deltas["pair"] == pair].groupby("label")["delta"]
        mean = by_label.mean().reindex(order)
        marks = ["*" if significant.get((pair, lbl), False) else "" for lbl in order]
        text = [[f"{m:+.1f}{s}" if pd.notna(m) else ""] for m, s in zip(mean, marks)]
        scale = max(mean.abs().max(), 0.1)
        sns.heatmap(mean.to_frame(pair), annot=text, fmt="", cmap="RdYlGn", center=0, vmin=-scale, vmax=scale,
                    linewidths=0.5, ax=ax, cbar_kws={"label": "Δ (points)", "shrink": 0.6},
                    annot_kws={"fontsize": 8})
        ax.hlines(rules, *ax.get_xlim(), color="0.15", linewidth=1.5)
        ax.set(xlabel="", ylabel="")
        ax.tick_params(axis="y", labelrotation=0, labelsize=8)
    suptitle(fig, f"mean Δ {metric} over the CE student (points; scale per pair; * {CORRECTIONS[correction]}-adjusted "
                  f"p < {SIGNIFICANCE:g} over the methods of the pair)", setting)
    plt.close(fig)
    return fig


def _slug(text: str) -> str:
    """A folder name for a group's title: readable, cut to 80 characters, and unique by a hash of the whole title."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def plot_groups(frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """The groups (see ``groups``) that have something to plot: a group of teachers alone (teachers trained under
    their own recipe that no run of the results learned from) has none."""
    for title, group in groups(frame):
        if (group["kind"] != "teacher").any():
            yield title, group


def flagged_figures(frame: pd.DataFrame, table: pd.DataFrame, metric: str = "top1_best",
                    correction: str = "holm") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every plot of every group (:func:`plot_groups`) by name, None where a group has nothing to draw: each flagged
    label carries its markers and each figure the flags' footnotes as a caption. What ``kdbench report --plots``
    saves and the notebook shows."""
    flagged = row_flags(frame, table, metric)
    for title, group in plot_groups(frame):
        group, notes = for_plots(group, flagged)
        figures = {"accuracy_vs_throughput": plot_accuracy_vs_throughput(group, metric, title),
                   "top1": plot_top1(group, metric, title), "delta": plot_delta(group, metric, title),
                   "memory": plot_memory(group, title), "learning_curves": plot_learning_curves(group, table, title),
                   "heatmap": plot_heatmap(group, metric, title, correction)}
        for name, fig in figures.items():
            if fig is not None:
                caption(fig, notes + (_speed_source(group) if name == "accuracy_vs_throughput" else []))
        yield title, figures


def _speed_source(group: pd.DataFrame) -> list[str]:
    """The line that says where the throughput axis comes from, when ``kdbench costs`` priced runs of ``group``."""
    sittings = group["cost_sitting"].dropna().unique()
    if not len(sittings):
        return []
    return [f"img/s: {priced_in_sitting(sittings)}"
            + ("; the other runs: their own timings" if group["cost_sitting"].isna().any() else "")]


def save_plots(frame: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path, metric: str = "top1_best",
               correction: str = "holm") -> list[Path]:
    """Every plot (:func:`flagged_figures`), as PNG and SVG, into ``out_dir/<setting-and-protocol>/``; returns the
    files written."""
    out_dir, written = Path(out_dir), []
    for title, figures in flagged_figures(frame, table, metric, correction):
        folder = out_dir / _slug(title)
        folder.mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            for suffix in (".png", ".svg") if fig is not None else ():
                fig.savefig(folder / f"{name}{suffix}", dpi=150)
                written.append(folder / f"{name}{suffix}")
    return written
