"""How plots tell rows apart at 25 methods: each method family has a hue of its own (shades within the family) and
each method in a family a marker of its own; the teacher is black, the CE student grey. The same label gets the same
colour and marker in every plot of a group. Figure helpers shared by the plots live here too."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any

import pandas as pd

# Families of distillation (Method.family), in legend order, with the colour map their shades come from and the
# range of it they use (darkest first): neighbouring families' dark ends must not meet (assistant stays orange-yellow,
# layer-adding red).
FAMILY_COLOURS = {"logit": ("Blues", 0.95, 0.4), "feature": ("Greens", 0.95, 0.4), "relation": ("Purples", 0.95, 0.4),
                  "assistant": ("YlOrBr", 0.6, 0.35), "layer-adding": ("Reds", 0.95, 0.55),
                  "other": ("copper", 0.2, 0.8)}
LEGEND_ROW_PT, TITLE_IN = 15, 1.0  # a fontsize-8 legend entry with its spacing; the two-line headline
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h")
_TOP = {"teacher": ("teacher", "0.05", "*"), "student": ("CE student", "0.55", "o")}


@dataclass(frozen=True)
class Style:
    colour: Any
    marker: str
    family: str  # the legend section: a method family, or "teacher" / "CE student"


def styles(group: pd.DataFrame) -> dict[str, Style]:
    """A Style per row label of ``group``: teacher and CE student first, then the methods by family and, within a
    family, by mean top-1 (best first, darkest shade)."""
    import matplotlib

    out: dict[str, Style] = {}
    for kind, (family, colour, marker) in _TOP.items():
        for label in dict.fromkeys(group.loc[group["kind"] == kind, "label"]):
            out[label] = Style(colour, marker, family)
    methods = group[group["kind"] == "method"]
    families = methods["family"].where(methods["family"].isin(list(FAMILY_COLOURS)), "other")
    means = methods.assign(family=families).groupby(["family", "label"], sort=False)["top1_best"].mean()
    for family, (cmap, dark, light) in FAMILY_COLOURS.items():
        if family not in means.index.get_level_values(0):
            continue
        labels = means.loc[family].sort_values(ascending=False, kind="stable").index
        shades = [dark + (light - dark) * i / max(1, len(labels) - 1) for i in range(len(labels))]
        for i, (label, shade) in enumerate(zip(labels, shades)):
            out[label] = Style(matplotlib.colormaps[cmap](shade), _MARKERS[i % len(_MARKERS)], family)
    return out


def colours(group: pd.DataFrame) -> dict[str, Any]:
    return {label: style.colour for label, style in styles(group).items()}


def figure(panels: list[str], headline: str, setting: str, height: float, width: float = 5.5, cols: int = 3):
    """A figure with a panel per entry of ``panels`` (at most ``cols`` per row), the headline and setting on top."""
    import matplotlib.pyplot as plt

    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    suptitle(fig, headline, setting)
    return fig, list(axes.flat)


def suptitle(fig, headline: str, setting: str) -> None:
    """The headline, then the setting broken between its " · " parts to fit the figure's width."""
    chars = int(fig.get_figwidth() * 14)  # about 14 characters of 10-point text per inch
    lines = [textwrap.fill(headline, chars)]
    for part in setting.split(" · ") if setting else []:
        if len(lines) > 1 and len(lines[-1]) + 3 + len(part) <= chars:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    fig.suptitle("\n".join(lines), fontsize=10)


def legend(fig, shown: dict[str, Style], line: bool = False) -> None:
    """A legend right of the panels, in sections per family (the section name as an unmarked entry)."""
    from matplotlib.lines import Line2D

    handles, family = [], None
    for label, style in shown.items():
        if style.family != family and style.family in FAMILY_COLOURS:
            handles.append(Line2D([], [], linestyle="", marker="", label=f"{style.family}:"))
        family = style.family
        handles.append(Line2D([], [], color=style.colour, marker=style.marker, markersize=6,
                              linestyle="-" if line else "", label=label))
    rows = max(1, int((fig.get_figheight() - TITLE_IN) * 72 / LEGEND_ROW_PT))  # what fits below the headline
    fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8,
               ncols=math.ceil(len(handles) / rows))
