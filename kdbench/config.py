"""Sweep files: everything ``kdbench run`` takes, as YAML, checked against a schema before anything runs.

A file holds what the command line holds (methods, pairs, seeds, dataset, recipes, protocol, per-method options,
executor and resources); flags given on the command line override it, as mdistiller's ``opts`` override its YAML.
The schema is an OmegaConf structured config (:class:`SweepFile`), so an unknown key or a value of the wrong type is
refused with the key named. A per-method option given as a list (``--set kd.temperature=2,4``) is a grid: the
sweep runs the product of the lists, one run per combination. The resolved sweep is written beside the results
(``sweep.yaml``), so a table can be traced back to the settings that made it.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from kdbench.errors import KdbenchError
from kdbench.spec import PROTOCOLS, RECIPES, Pair, RunSpec, SweepSpec, teacher_recipe_of

SWEEP_NAME = "sweep.yaml"  # the latest resolved sweep of a results folder; every one is kept under sweeps/


@dataclass
class SweepFile:
    """The schema of a sweep file; a key is the ``kdbench run`` flag of the same name (``_`` for ``-``), except
    ``options`` (``--set``), ``ta_chains``, ``teacher_seeds``, ``precision`` (``--amp``: bf16) and ``download``
    (``--no-download``: false); ``source`` and ``parts`` have no flag."""

    methods: list[str] = field(default_factory=list)
    pairs: list[str] = field(default_factory=list)  # TEACHER:STUDENT
    seeds: list[int] = field(default_factory=lambda: [0])
    dataset: str = "cifar100"
    recipe: str = "paper"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    train_subset: Optional[int] = None
    image_size: Optional[int] = None
    test_subset: Optional[int] = None
    lr: Optional[float] = None
    val_split: Optional[int] = None
    teacher_recipe: Optional[str] = None
    teacher_epochs: Optional[int] = None
    teacher_train_subset: Optional[int] = None
    teacher_lr: Optional[float] = None
    teacher_seeds: list[int] = field(default_factory=lambda: [0])
    teacher_ckpt: Optional[str] = None
    protocol: str = PROTOCOLS[0]
    # method -> option -> value, or a list of values (a grid)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    ta_chains: list[str] = field(default_factory=list)  # TEACHER:TA1:...:STUDENT
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: Optional[str] = None
    data_backend: Optional[str] = None
    gpus_per_run: Optional[int] = None
    sync_bn: bool = False
    data_dir: Optional[str] = None
    download: bool = True
    results_dir: str = "results"
    reuse_stale: bool = False
    retry_failed: bool = False
    executor: str = "local"
    ray_address: Optional[str] = None
    ray_cpus: int = 1
    runs_per_gpu: int = 1
    log: list[str] = field(default_factory=list)
    source: Optional[str] = None  # the published table a shipped sweep re-runs (configs/)
    # Sub-sweeps, each a mapping of these keys over the file's top level (a table whose methods do not all run on
    # every pair: FSP needs equal channels); the plan is their union. Flags given on the command line override all,
    # except --methods and --pairs, which select among each part's own.
    parts: list[Any] = field(default_factory=list)


KEYS = tuple(f.name for f in fields(SweepFile))


def _one_line(error: OmegaConfBaseException, where: str) -> KdbenchError:
    key = getattr(error, "full_key", "") or ""
    message = str(error).splitlines()[0]
    if isinstance(error, ConfigKeyError):
        return KdbenchError(f"{where}: unknown key {key or message!r}; valid keys: {', '.join(KEYS)}")
    return KdbenchError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def _merged(layers: list[tuple[Any, str]]) -> DictConfig:
    merged = OmegaConf.structured(SweepFile)
    for layer, where in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as error:
            raise _one_line(error, where) from None
    return merged


def _complete(cfg: DictConfig, where: str) -> None:
    if not cfg.methods:
        from kdbench.methods import list_methods

        raise KdbenchError(f"no methods{where}: give --methods or `methods:` in the sweep file; valid methods: "
                           f"{', '.join(list_methods())}")
    if not cfg.pairs:
        raise KdbenchError(f"no pairs{where}: give --pairs or `pairs:` in the sweep file; write TEACHER:STUDENT "
                           f"pairs, e.g. vgg13:vgg8")


def load(path: Path | None, overrides: dict[str, Any]) -> DictConfig:
    """The schema's defaults, then the file at ``path`` (if any), then ``overrides`` (the flags given on the command
    line, already typed); ``options`` merge per method and key, so ``--set`` changes one option of the file's. Each
    of the file's ``parts`` is resolved the same way, over the file's top level, and kept in ``parts``."""
    file, parts = OmegaConf.create({}), []
    if path is not None:
        if not path.is_file():
            raise KdbenchError(f"sweep file {path} does not exist or is not a file")
        try:
            file = OmegaConf.load(path)
        except Exception as error:
            raise KdbenchError(f"sweep file {path} is not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(file, DictConfig):
            raise KdbenchError(f"sweep file {path} must be a mapping of keys ({', '.join(KEYS)})")
        parts = list(file.pop("parts", None) or [])
    where = f"sweep file {path}"
    top = _merged([(file, where), (overrides, "command line")])
    # Over parts, --methods and --pairs select: each part keeps the methods and pairs of its own that they name.
    select = {key: overrides[key] for key in ("methods", "pairs") if key in overrides} if parts else {}
    rest = {key: value for key, value in overrides.items() if key not in select}
    resolved, available = [], {"methods": set(), "pairs": set()}
    for number, part in enumerate(parts, 1):
        if not isinstance(part, DictConfig) or part.get("parts"):
            raise KdbenchError(f"{where}: part {number} must be a mapping of keys other than parts")
        part.pop("parts", None)  # a resolved sweep's parts say `parts: []`
        here = f"{where}, part {number}"
        merged = _merged([(file, where), (part, here), (rest, "command line")])
        merged.parts = []
        _complete(merged, f" in part {number} of {where}")
        _options_run(part.get("options") or {}, merged.methods, here, "the part")
        for key, chosen in select.items():
            available[key].update(merged[key])
            merged[key] = [value for value in merged[key] if value in chosen]
        if merged.methods and merged.pairs:
            # options of the file's top level and of --set reach the parts that run their method
            merged.options = {m: keys for m, keys in merged.options.items() if m in merged.methods}
            resolved.append(merged)
    if parts and not resolved:
        raise KdbenchError(f"--methods/--pairs select nothing of {where}; its parts run "
                           + "; ".join(f"{key} {', '.join(sorted(values))}" for key, values in available.items()
                                       if values))
    if not resolved:
        _complete(top, "")
    _options_run(top.options, sorted({m for part in resolved for m in part.methods}) or top.methods,
                 "--set or the sweep file's options", "no part" if resolved else "the sweep")
    top.parts = resolved
    return top


def _options_run(options, methods, where: str, runner: str) -> None:
    """Refuses options for a method that ``runner`` (the sweep, a part, no part) does not run: they would be lost."""
    stray = [m for m in options if m not in methods]
    if stray:
        verb = "runs" if runner == "no part" else "does not run"
        raise KdbenchError(f"{where}: options for {', '.join(map(str, stray))}, which {runner} {verb} (methods: "
                           f"{', '.join(map(str, methods))})")


def option_grid(options: DictConfig | dict) -> list[tuple[tuple[str, str, str], ...]]:
    """Every combination of the per-method options, a list being a grid axis: ``{kd: {temperature: [2, 4]}}`` gives
    ``[(("kd", "temperature", "2"),), (("kd", "temperature", "4"),)]``. Values become text, as ``--set`` gives them."""
    axes = []
    for method, keys in options.items():
        if not isinstance(keys, (DictConfig, dict)):
            raise KdbenchError(f"options.{method} must map option names to values, e.g. {{temperature: 4}}")
        for key, value in keys.items():
            values = list(value) if isinstance(value, (ListConfig, list, tuple)) else [value]
            if not values:
                raise KdbenchError(f"option {method}.{key} has an empty list of values")
            axes.append([(str(method), str(key), _text(v)) for v in values])
    return list(itertools.product(*axes))


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def sweeps(cfg: DictConfig, device: str, teacher_ckpt_sha256: str | None = None) -> list[SweepSpec]:
    """One sweep spec per part and combination of the option grid; ``device`` as resolved (``auto`` is CUDA where
    there is one)."""
    if cfg.parts:
        return [spec for part in cfg.parts for spec in sweeps(part, device, teacher_ckpt_sha256)]
    _check_presets(cfg.methods, cfg.protocol)
    recipe = RECIPES.get(cfg.recipe).overridden(epochs=cfg.epochs, batch_size=cfg.batch_size,
                                                train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                                                lr=cfg.lr, val_split=cfg.val_split, image_size=cfg.image_size)
    teacher_recipe = RECIPES.get(cfg.teacher_recipe) if cfg.teacher_recipe else teacher_recipe_of(recipe)
    # A validation split is a partition of the data, so the teachers hold out the same images: none of its labels
    # reaches a student through its teacher.
    teacher_recipe = teacher_recipe.overridden(epochs=cfg.teacher_epochs, train_subset=cfg.teacher_train_subset,
                                               lr=cfg.teacher_lr, what="--teacher-").overridden(val_split=cfg.val_split,
                                                                                                image_size=cfg.image_size)
    common = dict(methods=tuple(dict.fromkeys(cfg.methods)),
                  pairs=tuple(dict.fromkeys(Pair.parse(p) for p in cfg.pairs)), seeds=tuple(cfg.seeds),
                  dataset=cfg.dataset, recipe=recipe, teacher_recipe=teacher_recipe, protocol=cfg.protocol,
                  device=device, precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile,
                  data_backend=cfg.data_backend, world_size=world_size(cfg.gpus_per_run), sync_bn=cfg.sync_bn,
                  teacher_seeds=tuple(cfg.teacher_seeds),
                  ta_chains=tuple(tuple(c.split(":")) for c in cfg.ta_chains),
                  teacher_ckpt_sha256=teacher_ckpt_sha256)
    return [SweepSpec(**common, method_options=combination) for combination in option_grid(cfg.options)]


def world_size(gpus_per_run: int | None) -> int:
    """Processes per run: ``--gpus-per-run``, or what a launcher (torchrun) set; the two must agree."""
    from kdbench.distributed import launched_world_size

    launched = launched_world_size()
    if gpus_per_run is not None and gpus_per_run < 1:
        raise KdbenchError(f"--gpus-per-run must be a positive integer, got {gpus_per_run}")
    if gpus_per_run is not None and launched > 1 and gpus_per_run != launched:
        raise KdbenchError(f"--gpus-per-run {gpus_per_run} in a process group of {launched} (WORLD_SIZE); give "
                           f"--gpus-per-run {launched} or leave it out under torchrun")
    return gpus_per_run or launched


def _check_presets(methods, protocol: str) -> None:
    """Refuses a distillation method (a plug-in, say) that sets no weights for the protocol asked for: it would run
    with its defaults under any protocol's name. The CE baseline learns from no teacher and has no protocol."""
    from kdbench.methods import method_class

    for name in methods:
        cls = method_class(name)
        if cls.needs_teacher and protocol not in cls.presets:
            defined = ", ".join(cls.presets) or "none"
            raise KdbenchError(f"method {name} defines no preset for protocol {protocol!r} (its presets: {defined}); "
                               f"add one to its `presets`, or choose a protocol it defines")


def plan(specs: list[SweepSpec]) -> list[RunSpec]:
    """The runs of all the grid's sweeps: each one's teachers first, a run shared by several combinations (a
    teacher, a method the grid does not vary) planned once."""
    return list(dict.fromkeys(run for sweep in specs for run in sweep.plan()))


def write_resolved(cfg: DictConfig, runs: list[RunSpec], results_dir: Path) -> Path:
    """Writes the resolved sweep as a loadable sweep file, headed by the ids of the runs it planned: ``sweep.yaml``
    (the latest) and ``sweeps/<digest>.yaml`` (every sweep that wrote into the folder). Returns the kept copy."""
    body = OmegaConf.to_yaml(cfg)
    header = "".join(f"# {line}\n" for line in ["the resolved sweep (kdbench run --config this file re-runs it)",
                                                f"planned runs ({len(runs)}):", *(f"  {r.run_id}" for r in runs)])
    text = header + body
    kept = results_dir / "sweeps" / f"sweep-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(text)
    (results_dir / SWEEP_NAME).write_text(text)
    return kept
