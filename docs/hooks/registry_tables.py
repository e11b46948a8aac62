"""MkDocs hook: the method and recipe tables of the docs, generated from kdbench's registries at build time.

A page asks for a table with a marker comment, which stays invisible where the Markdown is read as it is (GitHub):

- ``<!-- kdbench:methods FAMILY -->``: name, source, the method, ``logit_kd``, documented deviation;
- ``<!-- kdbench:options FAMILY -->``: default options, what each protocol's preset changes, per-pair values;
- ``<!-- kdbench:recipes -->``: every registered recipe's settings;
- ``<!-- kdbench:costs -->``: each method's training speed, memory and parameters on the reference set's runs;
- ``<!-- kdbench:compile -->``: the methods the plan refuses under ``--compile`` (or its CUDA-graph modes), and why.

FAMILY is a ``Method.family`` or ``all``. The tables are written from ``kdbench.methods`` and ``kdbench.spec.RECIPES``
on every build, so they never drift from the code and nothing generated is committed. A family of registered methods
that no page lists fails the build: a new family needs a page.

The hook also copies the reference set's plot, which lives beside its results outside ``docs/``, into the site, and
escapes the ``[flag]`` markers of the report pasted into the reference-results page, so that they read as text.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tabulate import tabulate

from kdbench.listing import source
from kdbench.methods import list_methods, method_class
from kdbench.methods.base import CUDA_GRAPH_MODES, LOGIT_OPTIONS
from kdbench.spec import PROTOCOLS, RECIPES

ROOT = Path(__file__).resolve().parents[2]
# The pairs of the reference set (Makefile, REFERENCE_PAIRS): their per-pair values get a column each.
REFERENCE_PAIRS = (("resnet56", "resnet20"), ("vgg13", "vgg8"))
# The field's ImageNet pairs (CRD, mdistiller): where a method's ImageNet values differ from its CIFAR ones.
IMAGENET_PAIRS = (("tv_resnet34", "tv_resnet18"), ("tv_resnet50", "mobilenet_v1"))
MARKER = re.compile(r"<!-- kdbench:(\w+)(?: ([\w-]+))? -->")
REPORT = re.compile(r"(<!-- reference-report:start -->\n)(.*?)(<!-- reference-report:end -->)", re.S)
# The reference set's plot, which the reference-results page shows; it lives beside its results, outside docs/.
PLOT = "results/reference-fashion-mnist-cpu-v1/plots/fashion-mnist-recipe-cpu-6-epochs-batch-64-1000-train-images-" \
       "2000-test-images-cp-83cc30bc/accuracy_vs_throughput.png"
PLOT_URI = "assets/reference-v1-accuracy-vs-throughput.png"
REFERENCE = ROOT / "results" / "reference-fashion-mnist-cpu"  # the reference set (Makefile, REFERENCE)

_listed_families: set[str] = set()


def families() -> dict[str, list[str]]:
    """Registered method names by ``Method.family``, in ``list_methods`` order."""
    grouped: dict[str, list[str]] = {}
    for name in list_methods():
        grouped.setdefault(method_class(name).family, []).append(name)
    return grouped


def _names(family: str) -> list[str]:
    names = list_methods() if family == "all" else families().get(family)
    if not names:
        raise ValueError(f"no registered method has family {family!r}; families: {', '.join(families())}")
    return names


def _table(rows: list[list[str]], headers: list[str]) -> str:
    """A Markdown table; a cell's line breaks become spaces and its pipes are escaped, an empty cell reads "—"."""
    cells = [[" ".join(str(cell).split()).replace("|", "\\|") or "—" for cell in row] for row in rows]
    return tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True)


def _first_paragraph(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0]


def _options(options: dict) -> str:
    return ", ".join(f"`{key}={value}`" for key, value in sorted(options.items()))


def methods_table(family: str) -> str:
    """Name, family, source (module docstring: ``kdbench list``'s), the method (class docstring), ``logit_kd`` and
    the documented deviation."""
    rows = []
    for name in _names(family):
        cls = method_class(name)
        rows.append([f"`{name}`", cls.family, source(name), _first_paragraph(cls.__dict__.get("__doc__")),
                     "yes" if cls.logit_kd else "no", cls.deviation])
    return _table(rows, ["method", "family", "source", "the method", "`logit_kd`", "documented deviation"])


def options_table(family: str) -> str:
    """The defaults (logit options apart), what each protocol's preset changes, and the values the official configs
    set for the reference pairs and the ImageNet pairs, all through ``Method.resolve_options`` and ``pair_defaults``."""
    rows = []
    for name in _names(family):
        cls = method_class(name)
        defaults = dict(cls.resolve_options({}))
        scaled = ", ".join(f"`{key}`" for key in cls.epoch_options)
        row = [f"`{name}`", _options({k: v for k, v in defaults.items() if k in LOGIT_OPTIONS}),
               _options({k: v for k, v in defaults.items() if k not in LOGIT_OPTIONS})
               + (f" ({scaled} scaled by E/240, on Tiny-ImageNet E/200, on ImageNet E/100)" if scaled else "")]
        for protocol in PROTOCOLS:
            preset = {k: v for k, v in cls.resolve_options({}, protocol) if defaults[k] != v}
            row.append(_options(preset) if preset else ("as defaults" if protocol in cls.presets else ""))
        rows.append(row + [_options(cls.pair_defaults(teacher, student))
                           for teacher, student in REFERENCE_PAIRS + IMAGENET_PAIRS])
    return _table(rows, ["method", "logit options (defaults)", "own options (defaults)",
                         *(f"`{protocol}`" for protocol in PROTOCOLS),
                         *(f"{teacher} → {student}" for teacher, student in REFERENCE_PAIRS + IMAGENET_PAIRS)])


def _value(value) -> str:
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value)
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return f"{value:,}" if isinstance(value, int) else str(value)


def recipes_table() -> str:
    """A row per ``Recipe`` field and a column per registered recipe, and the epochs the lr decays after."""
    recipes = [RECIPES.get(name) for name in RECIPES.names()]
    rows = [[f"`{field.name}`", *(_value(getattr(recipe, field.name)) for recipe in recipes)]
            for field in dataclasses.fields(recipes[0]) if field.name != "name"]
    rows.append(["lr ×`lr_decay` after epochs", *(_value(recipe.milestone_epochs()) for recipe in recipes)])
    return _table(rows, ["field", *(f"`{recipe.name}`" for recipe in recipes)])


def costs_table() -> str:
    """What each method cost on the reference set (``REFERENCE``: the cpu recipe on a 2-core CPU), per reference
    pair: the mean over its finished runs of training img/s (as the report shows it: from the set's sitting,
    ``kdbench costs``, where it priced the runs) and peak memory, its trained parameters beyond the student's, and
    the deployed model's parameters (more than the CE student's where a method leaves layers in it).
    A method whose runs are not in the set yet reads "—"."""
    from kdbench.report import entries, leaderboard, load_results

    board = leaderboard(entries(load_results([REFERENCE])), None)
    rows = []
    for name in list_methods():
        row = [f"`{name}`"]
        for teacher, student in REFERENCE_PAIRS:
            found = board[(board["pair"] == f"{teacher}->{student}") & (board["method"] == name)
                          & (board["kind"] == ("student" if name == "student" else "method"))]
            cost = found.iloc[0] if len(found) else None
            row += ["" if cost is None else f"{cost[key] * scale:,.{digits}f}"
                    for key, scale, digits in (("train_images_per_s", 1, 0), ("peak_bytes", 2**-20, 0),
                                               ("extra_params_train", 1, 0), ("inference_params", 1, 0))]
        rows.append(row)
    return _table(rows, ["method", *(f"{t} → {s}: {what}" for t, s in REFERENCE_PAIRS
                                     for what in ("train img/s", "peak MiB", "extra params", "deployed params"))])


def compile_table() -> str:
    """The methods that cannot train compiled (``Method.breaks_compile``) or under CUDA graphs
    (``Method.breaks_cuda_graphs``), and why: the plan refuses them."""
    rows = [[f"`{name}`", "every mode" if cls.breaks_compile else ", ".join(CUDA_GRAPH_MODES),
             cls.breaks_compile or cls.breaks_cuda_graphs]
            for name, cls in ((name, method_class(name)) for name in list_methods())
            if cls.breaks_compile or cls.breaks_cuda_graphs]
    return _table(rows, ["method", "refused under --compile", "why"])


def render(markdown: str) -> str:
    """``markdown`` with every marker replaced by its table; an unknown marker raises ValueError."""
    def table(match: re.Match) -> str:
        kind, family = match.groups()
        if kind == "recipes" and family is None:
            return recipes_table()
        if kind == "costs" and family is None:
            return costs_table()
        if kind == "compile" and family is None:
            return compile_table()
        if kind in ("methods", "options") and family:
            if kind == "methods" and family != "all":  # a family page, not the overview
                _listed_families.add(family)
            return (methods_table if kind == "methods" else options_table)(family)
        raise ValueError(f"unknown docs marker {match.group(0)}")

    return MARKER.sub(table, markdown)


def on_pre_build(config) -> None:
    _listed_families.clear()


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, PLOT_URI, abs_src_path=str(ROOT / PLOT)))
    return files


def escape_report(markdown: str) -> str:
    """The pasted ``kdbench report`` output with its ``[flag]`` markers escaped: Markdown would read ``[o] [e]`` as a
    reference link (and mkdocs-autorefs warn that ``e`` is no target). The page's source stays the report verbatim."""
    def escaped(match: re.Match) -> str:
        return match.group(1) + match.group(2).replace("[", "\\[") + match.group(3)

    return REPORT.sub(escaped, markdown)


def on_page_markdown(markdown, page, config, files):
    from mkdocs.exceptions import PluginError

    try:
        return escape_report(render(markdown))
    except ValueError as error:
        raise PluginError(f"{page.file.src_uri}: {error}") from None


def on_post_build(config) -> None:
    from mkdocs.exceptions import PluginError

    unlisted = set(families()) - _listed_families
    if unlisted:
        raise PluginError(f"no docs page lists the methods of family {', '.join(sorted(unlisted))}: add "
                          "<!-- kdbench:methods FAMILY --> to a page")
