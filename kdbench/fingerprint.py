"""Code fingerprints: which source decided a run's numbers, so a changed method or harness is never reused silently.

A run's code is the import closure, within kdbench and the method's own package, of the harness and of its
method's module (a plug-in's module included), plus the code that trained its teacher and assistants (the CE
baseline's module, and every method's whose runs teach it). Reporting, the CLI, the results store and error types
are left out: they do not change a number. Each file is hashed as its syntax tree without docstrings, so editing a
comment or a docstring changes nothing; a code edit changes the fingerprint of every run whose closure holds it.
The tree dump can differ between Python versions, which, like the torch build, makes fingerprints per machine.

A record also stores the kernels the machine's libraries chose (``numeric_kernels``): the same code and build give
other bits under other kernels, so a replay compares them, where both the run and the replay list them, before it
compares numbers.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from kdbench.results import ResultsStore, RunRecord
    from kdbench.spec import RunSpec

# Modules that do not decide a run's numbers (and this one).
NOT_NUMBERS = ("kdbench.report", "kdbench.cli", "kdbench.results", "kdbench.errors", "kdbench.fingerprint",
               "kdbench.progress", "kdbench.executors")
CORE = "kdbench.harness"
# Modules that only some runs execute, with the test of a spec that says whether it does: counted in those runs'
# code only, so that changing, say, the compiled path leaves every eager run's fingerprint as it was. Each imports
# no kdbench module outside the harness's closure.
OPTIONAL: dict[str, Callable[[RunSpec], bool]] = {"kdbench.compiled": lambda spec: spec.compile is not None,
                                                  "kdbench.distributed": lambda spec: (spec.world_size or 1) > 1}


def _module_file(name: str) -> Path | None:
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a class or function imported from a module, not a module
            return None
        origin = spec.origin if spec else None
    return Path(origin) if origin and origin.endswith(".py") else None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> tuple[str, tuple[str, ...]]:
    """(hash of the docstring-free syntax tree, names of the modules the file imports). Read once per process, when
    the module is first fingerprinted, right after it was imported: a file edited while a sweep runs is not the code
    that runs, so it must not be the code that is recorded."""
    tree = ast.parse(path.read_text(), str(path))
    imports: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module later
                base = "." * node.level + base
            imports += [base] + [f"{base}.{alias.name}" if base.strip(".") else base + alias.name
                                 for alias in node.names]
    digest = hashlib.sha256(ast.dump(_strip_docstrings(tree)).encode()).hexdigest()
    return digest, tuple(imports)


def _resolve(name: str, importer: str) -> str:
    if not name.startswith("."):
        return name
    level = len(name) - len(name.lstrip("."))
    package = importer.rsplit(".", level)[0] if importer else ""
    rest = name.lstrip(".")
    return f"{package}.{rest}" if rest else package


def module_closure(root: str) -> dict[str, str]:
    """``{module name: hash}`` for ``root`` and every module it imports from its own top-level package or kdbench,
    transitively, except NOT_NUMBERS and OPTIONAL."""
    packages = {"kdbench", root.split(".")[0]}
    seen: dict[str, str] = {}
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen or name in NOT_NUMBERS or name in OPTIONAL or name.split(".")[0] not in packages:
            continue
        path = _module_file(name)
        if path is None:
            continue
        digest, imports = _parsed(path)
        seen[name] = digest
        stack += [_resolve(i, name if path.name != "__init__.py" else name + ".x") for i in imports]
    return seen


def method_module(method: str) -> str:
    from kdbench.methods import method_class

    return method_class(method).__module__


def code_files(methods: tuple[str, ...]) -> dict[str, str]:
    """Module hashes of the harness and of the given methods' modules."""
    files = module_closure(CORE)
    for method in methods:
        files.update(module_closure(method_module(method)))
    return dict(sorted(files.items()))


def digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def run_methods(spec) -> tuple[str, ...]:
    """The methods whose code made ``spec``'s numbers: its own, the teacher's (the CE baseline) and the assistants'."""
    if spec.teacher is None:
        return (spec.method,)
    return tuple(dict.fromkeys(("student", "kd", spec.method) if spec.assistants else ("student", spec.method)))


def numeric_kernels() -> dict[str, str]:
    """The kernels this machine runs: torch's CPU dispatch level, and each loaded BLAS's version and kernel set, by
    the package that ships it (``numpy: openblas 0.3.31.188.0 SkylakeX; scipy: …``). OpenBLAS built with
    DYNAMIC_ARCH (numpy's, scipy's and faiss's wheels) picks its kernels per CPU, and scikit-learn's LDA (letKD-2's
    fit) gives other bits under SkylakeX than under Haswell on the same code and build (docs/user-guide.md,
    Replays). Which packages are listed depends on what the process imported (a run's method loads its own). Not
    part of the fingerprint: the code is the same."""
    import numpy  # noqa: F401  (loads numpy's BLAS, so that it is listed)
    import torch
    from threadpoolctl import threadpool_info

    blas = {f"{_shipped_by(lib)}: {lib['internal_api']} {lib.get('version')} {lib.get('architecture')}"
            for lib in threadpool_info() if lib["user_api"] == "blas"}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "blas_kernels": "; ".join(sorted(blas))}


def _shipped_by(library: dict) -> str:
    """The package whose wheel holds a loaded library (``numpy.libs/…`` → numpy), else the library's own name."""
    folder = Path(library["filepath"]).parent.name
    return folder.removesuffix(".libs") if folder.endswith(".libs") else library["prefix"]


def differing_blas(recorded: str, here: str) -> list[str]:
    """The BLAS libraries that both ``blas_kernels`` values list with another version or kernel set, as phrases."""
    def by_package(value: str) -> dict[str, str]:
        return dict(entry.split(": ", 1) for entry in value.split("; ") if ": " in entry)

    old, new = by_package(recorded), by_package(here)
    return [f"{name}'s BLAS {old[name]!r} here {new[name]!r}" for name in sorted(old.keys() & new.keys())
            if old[name] != new[name]]


def fingerprint(spec) -> dict[str, object]:
    """What a record stores: the run's fingerprint, the shared core's, the per-module hashes behind them, and the
    machine's numeric kernels (taken after the run's method was imported, so that the BLAS it loads is listed)."""
    files = code_files(run_methods(spec))
    files.update({name: _parsed(_module_file(name))[0] for name, used in OPTIONAL.items() if used(spec)})
    return {"code_fingerprint": digest(files), "code_core": digest(module_closure(CORE)), "code_files": files,
            **numeric_kernels()}


def changed_modules(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """Modules whose code differs between two ``code_files`` maps (all of them when the old map is unknown)."""
    if not old:
        return ["(no fingerprint recorded)"]
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))


def stale_reason(record: RunRecord | None, code: dict) -> str | None:
    """Why a finished run's numbers no longer come from the current code (the modules that changed), or None: also
    None when the current code replayed the run and reproduced its numbers (``kdbench.replay``)."""
    if record is None or record.status != "finished":
        return None
    if (record.provenance.get("code_fingerprint") == code["code_fingerprint"]
            or code["code_fingerprint"] in record.provenance.get("replays", {})):
        return None
    return ", ".join(changed_modules(record.provenance.get("code_files"), code["code_files"]))


def stale_runs(specs: list[RunSpec], store: ResultsStore) -> dict[str, str]:
    """Finished runs among ``specs`` that other code made: run id -> the modules that changed."""
    reasons = {spec.run_id: stale_reason(store.load_record(spec.run_id), fingerprint(spec)) for spec in specs}
    return {run_id: reason for run_id, reason in reasons.items() if reason}
