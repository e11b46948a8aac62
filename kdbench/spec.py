"""Run specifications: frozen, serialisable descriptions of one unit of work.

A :class:`RunSpec` fully determines a run; its ``run_id`` is a hash of its canonical JSON, so the
same command maps to the same result folder (skip when finished, resume when interrupted).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

if TYPE_CHECKING:
    from kdbench.data import DatasetInfo

# Loss-weight presets, each a set of method option values (Method.presets); the first is the default. official:
# each method as its own official code runs it; crd: HobbitLong/RepDistiller's convention (scripts/run_cifar_distill.sh:
# no logit KD beside a feature loss); semckd: DefangChen/SemCKD's (README.md, scripts/run_cifar_distill.sh
# -r 1 -a 1: CE + KD added to every method).
PROTOCOLS = ("official", "crd", "semckd")
PRECISIONS = ("fp32", "bf16")
# torch.compile modes (kdbench run --compile MODE): the student and the frozen models are compiled, not the method.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# How the folder datasets' JPEGs are decoded and augmented (kdbench.folder_loader); the first is the default.
DATA_BACKENDS = ("cpu", "device")
# Seeds are integers in 0 <= seed < SEED_LIMIT, the signed 32-bit range that every seeded library takes; far larger
# ones overflowed the results table's int64 columns after the teacher had trained.
SEED_LIMIT = 2**31


@dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule and data budget of one training run (teachers have recipes of their own)."""

    name: str
    epochs: int
    batch_size: int = 64
    lr: float | None = None  # None: the trained model's RepDistiller base lr (0.05, or 0.01 for light models)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.625, 0.75, 0.875)  # fractions of `epochs`: 150/180/210 of 240
    lr_decay: float = 0.1
    train_subset: int | None = None  # at most this many training images: a fixed subset, the same for every run
    test_subset: int | None = None  # at most this many test images (fixed subset); None: the whole test set
    # Training images held out as a validation split (a fixed subset, the same for every run of the dataset), never
    # trained on; the epoch with the best validation top-1 selects the reported test top-1 (top1_at_best_val).
    val_split: int | None = None
    # Evaluate (test set and validation split) after every this many epochs of each stage (a method's init stage, then
    # the main one) and after a stage's last (Recipe.evaluates); selection (top1_at_best_val, top1_best) ranges over
    # the main stage's evaluated epochs. On a small training subset evaluation costs more than training, so a
    # low-data recipe evaluates less often. None: every epoch (and no change to run ids).
    eval_every: int | None = None
    drop_last: bool = False
    warmup_steps: int = 50  # first steps of the first epoch, excluded from throughput
    pad_mode: str = "zeros"  # padding of the random crop: torchvision's default, or letKD's "reflect"
    # Side of the model's input for the folder datasets (ImageNet's 224, Tiny-ImageNet's 64), smaller for tests and
    # quick checks (kdbench.folder_data.Pipeline); None: the dataset's own. The 32x32 datasets take none.
    image_size: int | None = None
    # The global batch at which ``lr`` is given, when the recipe scales it linearly with the batch (Goyal et al. 2017,
    # as torchvision's and mdistiller's ImageNet recipes do): --batch-size B without --lr runs at lr·B/lr_batch.
    lr_batch: int | None = None
    fit_points: int | None = None  # cap on the points of a method's offline fit (k-means); None: every point
    # The registered recipe that trains the teachers of runs with this recipe; None: the recipe itself.
    teacher_recipe: str | None = None

    def evaluates(self, epoch: int, stage_epochs: int | None = None) -> bool:
        """Whether 0-indexed ``epoch`` of a stage ends with an evaluation: every ``eval_every``-th epoch of the stage
        and its last. The stage is the main one (``stage_epochs`` None: the recipe's epochs) or a method's init stage,
        whose epochs count from its own start (FT's 30 paraphraser epochs leave the student as it was)."""
        return (epoch + 1) % (self.eval_every or 1) == 0 or epoch + 1 >= (stage_epochs or self.epochs)

    def milestone_epochs(self) -> tuple[int, ...]:
        return tuple(round(f * self.epochs) for f in self.milestones)

    def lr_at(self, epoch: int, base_lr: float) -> float:
        """Learning rate for 0-indexed ``epoch`` (MultiStepLR stepped once per epoch)."""
        return base_lr * self.lr_decay ** sum(epoch >= m for m in self.milestone_epochs())

    def overridden(self, what: str = "--", **changes: Any) -> "Recipe":
        """A copy with the non-None ``changes`` applied, validated; ``what`` prefixes the option names in errors."""
        recipe = replace(self, **{k: v for k, v in changes.items() if v is not None})
        if self.lr_batch and self.lr and changes.get("batch_size") and changes.get("lr") is None:
            recipe = replace(recipe, lr=self.lr * recipe.batch_size / self.lr_batch, lr_batch=recipe.batch_size)
        if recipe.val_split == 0:  # --val-split 0: no validation split
            recipe = replace(recipe, val_split=None)
        for key in ("epochs", "batch_size", "train_subset", "test_subset", "fit_points", "val_split", "eval_every",
                    "image_size"):
            value = getattr(recipe, key)
            if value is not None and value < 1:
                what_range = "an integer >= 0" if key == "val_split" else "a positive integer"
                raise KdbenchError(f"{what}{key.replace('_', '-')} must be {what_range}, got {value}")
        if recipe.lr is not None and not (math.isfinite(recipe.lr) and recipe.lr > 0):
            raise KdbenchError(f"{what}lr must be a finite number > 0, got {recipe.lr}")
        return recipe

    def train_images(self, split_size: int | None) -> int | None:
        """Training images a run takes: the subset is an upper bound, so a smaller split (less its validation
        images) is used whole."""
        return _taken(self.train_subset, None if split_size is None else split_size - (self.val_split or 0))

    def test_images(self, split_size: int | None) -> int | None:
        """Test images a run evaluates on, as `train_images`."""
        return _taken(self.test_subset, split_size)

    def on(self, info: "DatasetInfo") -> "Recipe":
        """The recipe on ``info``'s dataset: a subset that holds a whole split is the same experiment as no subset,
        so it is dropped, and both get the same run id."""
        def within(subset: int | None, size: int | None) -> int | None:
            return None if subset is not None and size is not None and subset >= size else subset

        pool = None if info.train_size is None else info.train_size - (self.val_split or 0)
        return replace(self, train_subset=within(self.train_subset, pool),
                       test_subset=within(self.test_subset, info.test_size))


def _taken(subset: int | None, split_size: int | None) -> int | None:
    return subset if split_size is None else min(subset or split_size, split_size)


RECIPES: Registry[Recipe] = Registry("recipe")
# HobbitLong/RepDistiller's train_teacher.py and train_student.py: one recipe for both.
RECIPES.add("paper", Recipe("paper", epochs=240, teacher_recipe="paper"))
# letKD's own optimisation (adagorgun/letKD-framework: the CIFAR100/ configs' optimiser, and
# distillation/datasets/cifar_dataset.py): Nesterov momentum, reflect-padded crops; RepDistiller teachers.
RECIPES.add("letkd-native", Recipe("letkd-native", epochs=240, nesterov=True, pad_mode="reflect",
                                   teacher_recipe="paper"))
# A CPU smoke run: 3 epochs on a fixed 5,000-image subset; its teachers train on 12,000 images for 4 epochs, so that
# they beat the students they teach. Checks that things run, nothing more.
RECIPES.add("short-teacher", Recipe("short-teacher", epochs=4, train_subset=12_000, drop_last=True, warmup_steps=10,
                                    teacher_recipe="short-teacher"))
RECIPES.add("short", Recipe("short", epochs=3, train_subset=5000, drop_last=True, warmup_steps=10,
                            fit_points=100_000, teacher_recipe="short-teacher"))
# The CPU benchmark (docs/reference-results.md): on Fashion-MNIST, 5,000 training images are held out as the
# validation split that selects the reported epoch, and every run is evaluated on the whole test set. Teachers (and
# teacher assistants) train on every other training image until their accuracy levels off; students train on a fixed
# 1,000-image subset, where a teacher clearly stronger than the CE student has something to give, for 30 epochs
# (450 steps), the last 11 at lr ×0.1 and lower, so that they converge (20 epochs left a CE resnet20 still rising).
# Each evaluation reads 15,000 images against the 1,000 an epoch trains on, so students are evaluated after every
# sixth epoch of each stage: epochs 6, 12, 18, 24 and 30, two of them after the first decay (24 evaluations per
# run would cost the set 55 CPU-hours against its budget of 24).
RECIPES.add("cpu-teacher", Recipe("cpu-teacher", epochs=10, val_split=5000, drop_last=True, warmup_steps=10,
                                  teacher_recipe="cpu-teacher"))
RECIPES.add("cpu", Recipe("cpu", epochs=30, train_subset=1000, val_split=5000, eval_every=6, drop_last=True,
                          warmup_steps=10, fit_points=200_000, teacher_recipe="cpu-teacher"))
# ImageNet-1k (torchvision's references/classification and CRD's train_student.py): 100 epochs of SGD, momentum 0.9,
# weight decay 1e-4, lr 0.1 at batch 256, ×0.1 at epochs 30, 60 and 90. mdistiller trains at batch 512 and lr 0.2, the
# same lr per image, registered apart (configs/imagenet/*/*.yaml), since its published numbers were trained so.
# Teachers are torchvision's published weights (--teacher-ckpt).
RECIPES.add("imagenet", Recipe("imagenet", epochs=100, batch_size=256, lr=0.1, lr_batch=256, weight_decay=1e-4,
                               milestones=(0.3, 0.6, 0.9)))
RECIPES.add("imagenet-mdistiller", RECIPES.get("imagenet").overridden(batch_size=512, name="imagenet-mdistiller"))
# Tiny-ImageNet as mdistiller's DOT configs train it (configs/tiny_imagenet/dot/*.yaml): 200 epochs, batch 256,
# lr 0.2, ×0.1 at epochs 60, 120 and 160, weight decay 5e-4.
RECIPES.add("tiny-imagenet", Recipe("tiny-imagenet", epochs=200, batch_size=256, lr=0.2, lr_batch=256,
                                    milestones=(0.3, 0.6, 0.8)))


def teacher_recipe_of(recipe: Recipe) -> Recipe:
    """The recipe that trains the teachers of runs with ``recipe``: the registered one it names (student overrides such
    as --epochs do not reach it), or ``recipe`` itself when it names none."""
    return RECIPES.get(recipe.teacher_recipe) if recipe.teacher_recipe else recipe


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run; hashed into ``run_id``."""

    dataset: str
    student: str  # the architecture being trained (the teacher architecture when role == "teacher")
    method: str
    seed: int
    recipe: Recipe
    role: str = "student"
    teacher: str | None = None  # teacher architecture, None for runs without a teacher
    teacher_run: str | None = None  # run_id of the teacher's run (trained or imported checkpoint)
    pretrained: str | None = None  # sha256 of a checkpoint this run imports and evaluates instead of training
    method_options: tuple[tuple[str, Any], ...] = ()  # the method's resolved options (Method.defaults)
    # Teacher assistants that teach this run besides the teacher (TAKD/DGKD), largest first, and their runs.
    assistants: tuple[str, ...] = ()
    assistant_runs: tuple[str, ...] = ()
    protocol: str = PROTOCOLS[0]
    device: str = "cpu"  # resolved device type: "cpu" or "cuda"
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None  # a torch.compile mode (COMPILE_MODES); None: eager
    data_backend: str | None = None  # a folder dataset's decoding (DATA_BACKENDS); None: the default, or none
    # Processes that train the run together (kdbench.distributed), the recipe's batch_size being their global batch;
    # None: one. sync_bn: BatchNorm statistics over the global batch (True), not per process (None).
    world_size: int | None = None
    sync_bn: bool | None = None

    @property
    def pair(self) -> str | None:
        return f"{self.teacher}->{self.student}" if self.teacher else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        recipe = dict(data["recipe"])
        recipe["milestones"] = tuple(recipe["milestones"])
        options = tuple(tuple(item) for item in data.get("method_options", ()))
        return cls(**{**data, "recipe": Recipe(**recipe), "method_options": options,
                      "assistants": tuple(data.get("assistants", ())),
                      "assistant_runs": tuple(data.get("assistant_runs", ()))})

    @property
    def run_id(self) -> str:
        """Hash of the spec. Unset fields (None or empty) are left out, so adding an optional field to
        RunSpec or Recipe later keeps the ids, and the cached results, of every run that does not use it."""
        canonical = json.dumps(_set_fields(self.to_dict()), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        return f"{self.role}-{self.method}-{self.student}-s{self.seed}-{digest}"


def _set_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _set_fields(v) for k, v in value.items() if v is not None and v != () and v != []}
    return value


@dataclass(frozen=True)
class Pair:
    teacher: str
    student: str

    @classmethod
    def parse(cls, text: str) -> "Pair":
        parts = text.split(":")
        if len(parts) != 2 or not all(parts):
            raise KdbenchError(f"malformed pair {text!r}; write TEACHER:STUDENT, e.g. vgg13:vgg8")
        return cls(*parts)



@dataclass(frozen=True)
class SweepSpec:
    """The cross product one ``kdbench run`` asks for; :meth:`plan` expands it into runs."""

    methods: tuple[str, ...]
    pairs: tuple[Pair, ...]
    seeds: tuple[int, ...]
    dataset: str
    recipe: Recipe  # students' and teacher assistants' recipe
    teacher_recipe: Recipe | None = None  # None: the one `recipe` names (teacher_recipe_of)
    protocol: str = PROTOCOLS[0]
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None
    data_backend: str | None = None  # one of DATA_BACKENDS for a folder dataset; None: its default
    world_size: int = 1  # processes per run (kdbench.distributed)
    sync_bn: bool = False
    # Seeds of the teachers kdbench trains: every student seed of every method learns from each (a cross product).
    # A row of the report is taught by one teacher; several teacher seeds give rows of their own.
    teacher_seeds: tuple[int, ...] = (0,)
    teacher_ckpt_sha256: str | None = None  # import this checkpoint as the teacher instead of training one
    method_options: tuple[tuple[str, str, str], ...] = ()  # (method, key, value) from `--set METHOD.KEY=VALUE`
    ta_chains: tuple[tuple[str, ...], ...] = ()  # explicit teacher-assistant chains, TEACHER, TAs..., STUDENT

    def _common(self) -> dict[str, Any]:
        # the default backend is no setting, so runs that name it keep the ids of runs that do not
        backend = None if self.data_backend == DATA_BACKENDS[0] else self.data_backend
        return dict(dataset=self.dataset, device=self.device, precision=self.precision,
                    channels_last=self.channels_last, compile=self.compile, data_backend=backend,
                    world_size=self.world_size if self.world_size > 1 else None, sync_bn=self.sync_bn or None)

    def _on_dataset(self, recipe: Recipe) -> Recipe:
        from kdbench.data import dataset_info

        return recipe.on(dataset_info(self.dataset))

    def _teachers_recipe(self) -> Recipe:
        return self._on_dataset(self.teacher_recipe or teacher_recipe_of(self.recipe))

    def teacher_spec(self, arch: str, seed: int = 0) -> RunSpec:
        """The run that produces ``arch``'s teacher weights with teacher seed ``seed``, with the teacher recipe;
        shared by every method, student seed and protocol. An imported checkpoint is evaluated only, so its spec
        carries no recipe of its own."""
        if self.teacher_ckpt_sha256:
            return RunSpec(student=arch, method="student", seed=0, role="teacher", protocol="none",
                           recipe=self._on_dataset(self.recipe), pretrained=self.teacher_ckpt_sha256,
                           **self._common())
        return RunSpec(student=arch, method="student", seed=seed, role="teacher", protocol="none",
                       recipe=self._teachers_recipe(), **self._common())

    def teacher_seeds_planned(self) -> tuple[int, ...]:
        return (0,) if self.teacher_ckpt_sha256 else self.teacher_seeds

    def chain(self, pair: Pair) -> tuple[str, ...]:
        """The teacher-assistant chain ``(teacher, TAs..., student)`` for ``pair``: --ta-chain, else the default."""
        from kdbench.methods.assistants import default_chain, validate_chain

        given = [c for c in self.ta_chains if c and c[0] == pair.teacher]
        for chain in given:
            if chain[-1] == pair.student:
                return validate_chain(chain, pair.teacher, pair.student)
        if given:  # the chain starts at this teacher but does not end at this pair's student
            return validate_chain(given[0], pair.teacher, pair.student)
        return default_chain(pair.teacher, pair.student)

    def _taught(self, pair: Pair, arch: str, method: str, options: tuple, seed: int, role: str,
                assistants: tuple[RunSpec, ...], teacher_run: str) -> RunSpec:
        """A run taught by the teacher (and ``assistants``). A teacher assistant is the teacher of the next step of
        its chain, so it is trained as teachers are: with the teacher recipe (its data, epochs and schedule) and the
        teacher's seed, once per teacher, shared by every student seed (the rule for TAKD/DGKD;
        docs/methods/assistant.md). Students get the students' recipe and their own seed."""
        recipe = self._teachers_recipe() if role == "assistant" else self._on_dataset(self.recipe)
        return RunSpec(student=arch, method=method, seed=seed, role=role, teacher=pair.teacher,
                       teacher_run=teacher_run, protocol=self.protocol, method_options=options,
                       recipe=recipe, assistants=tuple(a.student for a in assistants),
                       assistant_runs=tuple(a.run_id for a in assistants), **self._common())

    def _validate(self) -> dict[str, dict[str, str]]:
        """Checks names, chains and settings before anything runs; returns the ``--set`` overrides per method."""
        from kdbench.data import dataset_info
        from kdbench.methods import list_methods, method_class
        from kdbench.models import model_entry

        dataset_info(self.dataset)
        if not self.methods:
            raise KdbenchError(f"--methods names no method; valid methods: {', '.join(list_methods())}")
        if not self.pairs:
            raise KdbenchError("--pairs names no pair; write TEACHER:STUDENT pairs, e.g. vgg13:vgg8")
        if not self.seeds:
            raise KdbenchError("--seeds names no seed; write comma-separated integers, e.g. 0,1,2")
        if not self.teacher_seeds:
            raise KdbenchError("--teacher-seeds names no seed; write comma-separated integers, e.g. 0,1,2")
        for what, seeds in (("--seeds", self.seeds), ("--teacher-seeds", self.teacher_seeds)):
            for seed in seeds:
                if not 0 <= seed < SEED_LIMIT:
                    raise KdbenchError(f"{what}: seed {seed} is out of range; seeds are integers from 0 to "
                                       f"{SEED_LIMIT - 1}")
        for pair in self.pairs:
            model_entry(pair.teacher), model_entry(pair.student)
        for chain in self.ta_chains:
            for arch in chain:
                model_entry(arch)
            if not any(chain[0] == p.teacher for p in self.pairs):
                raise KdbenchError(f"--ta-chain {':'.join(chain)} does not start at the teacher of any pair "
                                   f"({', '.join(f'{p.teacher}:{p.student}' for p in self.pairs)})")
        overrides: dict[str, dict[str, str]] = {name: {} for name in self.methods}
        for name in self.methods:
            method_class(name)
        for method, key, value in self.method_options:
            if method not in overrides:
                raise KdbenchError(f"--set {method}.{key}: {method!r} is not among --methods "
                                   f"({', '.join(self.methods)})")
            overrides[method][key] = value
        if self.protocol not in PROTOCOLS:
            raise KdbenchError(f"unknown protocol {self.protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
        if self.precision not in PRECISIONS:
            raise KdbenchError(f"unknown precision {self.precision!r}; valid precisions: {', '.join(PRECISIONS)}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise KdbenchError(f"unknown compile mode {self.compile!r}; valid modes: {', '.join(COMPILE_MODES)}")
        if self.teacher_ckpt_sha256 and len({p.teacher for p in self.pairs}) > 1:
            raise KdbenchError("--teacher-ckpt holds one teacher, but the pairs name several teacher architectures")
        return overrides

    def plan(self) -> list[RunSpec]:
        """Teacher runs first, then every (pair, method, seed), each preceded by the teacher assistants
        it needs; duplicates removed, order kept. Options resolve per pair: defaults, the protocol's preset, the
        pair's official values, then ``--set``. Every run is checked (:meth:`_check`) before the plan is returned."""
        from kdbench.methods import method_class
        from kdbench.methods.base import LOGIT_OPTIONS

        overrides = self._validate()
        classes = {name: method_class(name) for name in self.methods}
        teacher_seeds = self.teacher_seeds_planned()
        teachers = [self.teacher_spec(pair.teacher, t) for pair in self.pairs for t in teacher_seeds]
        taught: list[tuple[Pair, RunSpec]] = []  # every run after the teachers, with the pair it is planned for
        for pair, teacher_seed in ((pair, t) for pair in self.pairs for t in teacher_seeds):
            teacher_run = self.teacher_spec(pair.teacher, teacher_seed).run_id
            chain = self.chain(pair) if any(cls.uses_assistants for cls in classes.values()) else ()
            for name, cls in classes.items():
                if not cls.needs_teacher:  # the same runs under every teacher seed: the plan keeps them once
                    options = cls.resolve_options(overrides[name], "none", None, pair.student, self.recipe.epochs)
                    taught.extend((pair, RunSpec(student=pair.student, method=name, seed=seed, role="student",
                                                 protocol="none", method_options=options,
                                                 recipe=self._on_dataset(self.recipe), **self._common()))
                                  for seed in self.seeds)
                    continue
                options = cls.resolve_options(overrides[name], self.protocol, pair.teacher, pair.student,
                                              self.recipe.epochs)
                # A1 learns from the teacher alone: plain KD with the method's logit options, one run shared by
                # TAKD and DGKD whenever their logit options agree.
                first_ta = method_class("kd").resolve_options(
                    {k: v for k, v in options if k in LOGIT_OPTIONS}, self.protocol, pair.teacher, pair.student)
                assistants: tuple[RunSpec, ...] = ()  # trained as teachers are: once per teacher (see _taught)
                for k, arch in enumerate(chain[1:-1] if cls.uses_assistants else ()):
                    method, opts = (name, options) if k else ("kd", first_ta)
                    assistants += (self._taught(pair, arch, method, opts, teacher_seed, "assistant", assistants,
                                                teacher_run),)
                taught.extend((pair, a) for a in assistants)
                taught.extend((pair, self._taught(pair, pair.student, name, options, seed, "student", assistants,
                                                  teacher_run)) for seed in self.seeds)
        runs = list(dict.fromkeys([*teachers, *(run for _, run in taught)]))
        self._check(runs, taught)
        return runs

    def _check(self, runs: list[RunSpec], taught: list[tuple[Pair, RunSpec]]) -> None:
        """Fails on a run that could not train, before anything does: a run without a step per epoch, or a method
        that cannot be built on its models (e.g. fitnet.hint_layer=99). Each method is built once per distinct
        setting, on the feature shapes of its models; models and methods live on the meta device, so building them
        allocates, initialises and draws nothing."""
        import torch

        from kdbench.data import dataset_info
        from kdbench.methods import method_class
        from kdbench.methods.base import MethodContext
        from kdbench.models import create_model
        from kdbench.models.taps import feature_shapes

        info = dataset_info(self.dataset)
        if self.data_backend is not None and not (info.from_files and self.data_backend in DATA_BACKENDS):
            raise KdbenchError(f"data backend {self.data_backend!r}: {', '.join(DATA_BACKENDS)} decode imagenet and "
                               f"tiny-imagenet" + ("" if info.from_files else
                                                   f"; {self.dataset} is held whole on the run's device"))
        if self.sync_bn and self.world_size < 2:
            raise KdbenchError("--sync-bn synchronises BatchNorm over the processes of a run; give --gpus-per-run 2 "
                               "or more, or launch with torchrun")
        for run in runs:
            held_out = run.recipe.val_split or 0
            if info.train_size is not None and held_out >= info.train_size:
                raise KdbenchError(f"a validation split of {held_out} images leaves no training images: the "
                                   f"{self.dataset} training set holds {info.train_size}; use --val-split "
                                   f"{info.train_size - 1} or less (0: no split)")
            if not run.pretrained:
                _check_steps(run, method_class(run.method), info.train_size)
            refusal = method_class(run.method).refusal(run.compile)
            if refusal:
                raise KdbenchError(refusal)
            missing = sorted(set(method_class(run.method).views) - set(info.views))
            if missing:
                raise KdbenchError(f"{run.method} trains on the augmented view(s) {', '.join(missing)}, which the "
                                   f"{self.dataset} loader does not make; it runs on the 32x32 datasets")

        @functools.cache
        def shapes(arch: str, size: int) -> dict[str, tuple[int, ...]]:
            model = create_model(arch, info.num_classes, info.in_channels)
            return feature_shapes(model, (info.in_channels, size, size))

        built = set()
        with torch.device("meta"):
            for pair, run in taught:
                setting = (run.method, run.method_options, run.protocol, run.teacher, run.student, run.role,
                           len(run.assistants), run.recipe.batch_size)
                if setting in built:
                    continue
                built.add(setting)
                size = run.recipe.image_size or info.image_size
                ctx = MethodContext.of_run(run, info.num_classes, shapes(run.student, size),
                                           shapes(run.teacher, size) if run.teacher else None,
                                           run.recipe.train_images(info.train_size) or 0)
                try:
                    method_class(run.method)(ctx)
                except (KdbenchError, ValueError) as e:
                    where = (f"the teacher assistant {run.student} of {pair.teacher}:{pair.student}"
                             if run.role == "assistant" else f"the pair {pair.teacher}:{pair.student}")
                    raise KdbenchError(f"{run.method} cannot train {where}: {' '.join(str(e).split())}") from None


def _check_steps(run: RunSpec, method: type, dataset_size: int | None) -> None:
    """Fails when ``run`` would take no step per epoch (fewer training images than one batch, and the smaller last
    batch dropped by the recipe or because the method needs full batches), or a batch smaller than the method
    takes (``Method.min_batch``)."""
    recipe = run.recipe
    images = recipe.train_images(dataset_size)
    if images is None:
        return
    drops = recipe.drop_last or method.needs_full_batches
    ranks = run.world_size or 1
    if ranks > 1 and (recipe.batch_size % ranks or recipe.batch_size // ranks < method.min_batch):
        raise KdbenchError(f"the {run.role} {run.student} ({run.method}): a global batch of {recipe.batch_size} over "
                           f"{ranks} processes must split evenly, at least {method.min_batch} images to each; use a "
                           f"--batch-size that is a multiple of {ranks} (and at least {ranks * method.min_batch})")
    if drops and images < recipe.batch_size:
        why = f"{run.method} needs full batches" if method.needs_full_batches else \
            f"recipe {recipe.name} drops the last batch"
        fix = ("a larger --teacher-train-subset" if run.role == "teacher"
               else f"--batch-size {images} or less, or a larger --train-subset")
        raise KdbenchError(f"the {run.role} {run.student} ({run.method}) would train on {images} images in batches "
                           f"of {recipe.batch_size}, and {why}: not one step per epoch; use {fix}")
    last = images % recipe.batch_size
    if not drops and 0 < last < method.min_batch * ranks:
        each = f" ({method.min_batch} in each of {ranks} processes)" if ranks > 1 else ""
        raise KdbenchError(f"the {run.role} {run.student} ({run.method}) would train on {images} images in batches "
                           f"of {recipe.batch_size}, leaving a last batch of {last}, and {run.method} needs at least "
                           f"{method.min_batch * ranks} images a batch{each}; use another --train-subset or "
                           f"--batch-size")
