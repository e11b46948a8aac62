"""``kdbench list``: what the registries hold, as the runs would resolve it.

Every value shown comes from the code that runs (``Method.resolve_options``, ``pair_defaults``, the recipe
registry), so the listing cannot drift from what a sweep does: a method's options under each protocol, the values its
official configs set per pair, and each recipe's settings.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any

from tabulate import tabulate

from kdbench.errors import KdbenchError
from kdbench.spec import PROTOCOLS, RECIPES

WIDTH = 60  # wrap table cells at this many characters


def source(name: str) -> str:
    """The first paragraph of the method module's docstring (paper, official code), without its ``name``: prefix."""
    from kdbench.methods import method_class

    doc = (sys.modules[method_class(name).__module__].__doc__ or "").strip()
    first = " ".join(doc.split("\n\n")[0].split())
    return first.split(": ", 1)[1] if first.startswith("``") and ": " in first else first


def protocol_options(name: str) -> dict[str, dict[str, Any]]:
    """``{protocol: {option: value}}`` as a run without a pair resolves them."""
    from kdbench.methods import method_class

    return {p: dict(method_class(name).resolve_options({}, p)) for p in PROTOCOLS}


def varying(by_protocol: dict[str, dict[str, Any]]) -> list[str]:
    """The options whose value differs between protocols."""
    keys = next(iter(by_protocol.values()))
    return [k for k in keys if len({repr(o[k]) for o in by_protocol.values()}) > 1]


def pair_values(name: str) -> dict[str, dict[str, Any] | str]:
    """``{"teacher->student": options}`` for every ordered pair of zoo models that the method's official configs
    set values for, and the reason for pairs it refuses."""
    from kdbench.methods import method_class
    from kdbench.models import list_models

    cls, found = method_class(name), {}
    if not cls.needs_teacher:
        return found
    for teacher in list_models():
        for student in list_models():
            if teacher == student:
                continue
            try:
                values = cls.pair_defaults(teacher, student)
            except KdbenchError as refused:
                values = f"refused: {refused}"
            if values:
                found[f"{teacher}->{student}"] = values
    return found


def _count(n: int, what: str) -> str:
    return "" if not n else f"{n} {what}" + ("s" if n > 1 and what == "pair" else "")


def _options(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def methods_table() -> str:
    """One row per method: family, source, the options each protocol sets differently, and how many pairs have
    official values of their own."""
    from kdbench.methods import list_methods, method_class

    rows = []
    for name in list_methods():
        by_protocol = protocol_options(name)
        keys = varying(by_protocol)
        cells = [_options({k: by_protocol[p][k] for k in keys}) if keys else "(same)" for p in PROTOCOLS]
        pairs = pair_values(name).values()
        refused = sum(isinstance(v, str) for v in pairs)
        counts = [_count(len(pairs) - refused, "pair"), _count(refused, "refused") if refused else ""]
        rows.append([name, method_class(name).family, source(name), *cells, ", ".join(c for c in counts if c)])
    table = tabulate(rows, headers=["method", "family", "source", *PROTOCOLS, "per pair"],
                     maxcolwidths=[None, None, WIDTH, 30, 30, 30, None])
    return (f"{table}\n\nProtocol columns show the options that differ between protocols ((same): one objective "
            f"under every protocol). `kdbench list methods NAME` shows every option and the per-pair values.")


def method_detail(name: str) -> str:
    """Every option of one method: type, value under each protocol, range or choices, whether it is counted in
    epochs (and so rescaled by a recipe shorter than the official 240 epochs), then the per-pair values."""
    from kdbench.methods import method_class

    cls = method_class(name)
    by_protocol = protocol_options(name)
    rows = []
    for key, default in cls.defaults.items():
        allowed = cls.choices.get(key) or cls.ranges.get(key)
        notes = "counted in epochs: scales with the recipe" if key in cls.epoch_options else ""
        rows.append([key, type(default).__name__, *(by_protocol[p][key] for p in PROTOCOLS),
                     ", ".join(map(str, allowed)) if isinstance(allowed, tuple) else (allowed or ""), notes])
    text = f"{name} ({cls.family}): {source(name)}\n\n"
    text += tabulate(rows, headers=["option", "type", *PROTOCOLS, "valid", "note"]) if rows else "no options"
    pairs = pair_values(name)
    if pairs:
        text += "\n\nper pair (official configs; they apply under every protocol, --set still wins):\n"
        text += tabulate([[pair, v if isinstance(v, str) else _options(v)] for pair, v in pairs.items()],
                         headers=["pair", "values"], maxcolwidths=[None, 100])
    return text


def recipes_table() -> str:
    """Every registered recipe's settings, a column per recipe (None: the model's or the dataset's own)."""
    recipes = [RECIPES.get(name) for name in RECIPES.names()]
    keys = [f.name for f in fields(recipes[0]) if f.name != "name"]
    return tabulate([[key, *(getattr(r, key) for r in recipes)] for key in keys],
                    headers=["setting", *(r.name for r in recipes)])


def listing(what: str, name: str | None = None) -> str:
    """``kdbench list [WHAT [NAME]]``: the names of models, datasets, recipes and methods (``all``), the recipes'
    or the methods' table, or one method's options."""
    from kdbench.data import list_datasets
    from kdbench.methods import list_methods
    from kdbench.models import list_models

    if name:
        if what != "methods":
            raise KdbenchError(f"`kdbench list {what}` takes no name; `kdbench list methods NAME` shows a method")
        return method_detail(name)
    tables = {"recipes": recipes_table, "methods": methods_table}
    names = {"models": list_models, "datasets": list_datasets, "recipes": RECIPES.names, "methods": list_methods}
    return "\n".join(tables[w]() if what == w and w in tables else f"{w}: {', '.join(names[w]())}"
                     for w in names if what in ("all", w))
