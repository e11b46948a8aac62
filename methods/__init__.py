"""Registry of distillation methods (``kdbench.methods``), one module per method in this folder.

Every module here is imported on first use and registers its class with :func:`register_method`;
third-party packages add methods through the ``kdbench.methods`` entry-point group (each entry point
names a module or a Method subclass).
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from kdbench.registry import Registry

ENTRY_POINT_GROUP = "kdbench.methods"
_METHODS = Registry("method")
_loaded = False


def register_method(cls):
    """Class decorator: makes ``cls`` available as ``cls.name``."""
    _METHODS.add(cls.name, cls)
    return cls


from kdbench.methods import student  # noqa: E402,F401  (the baseline is registered whatever is imported first)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if isinstance(loaded, type) and loaded.name not in _METHODS:
            register_method(loaded)


def method_class(name: str):
    """The Method subclass registered as ``name``; a one-line KdbenchError lists valid names."""
    _load_all()
    return _METHODS.get(name)


def list_methods() -> list[str]:
    """The CE baseline, then every method by name (import order would depend on which module imports which)."""
    _load_all()
    return ["student", *sorted(name for name in _METHODS.names() if name != "student")]
