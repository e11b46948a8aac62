"""The method contract: what a distillation method declares and returns.

Modelled on mdistiller's ``Distiller``: a method is an ``nn.Module`` holding its auxiliary modules
(regressors, attention, ...) and returns a dict of named, already weighted loss terms for a batch. The
harness sums the terms, optimises the student and the method's parameters with one optimiser, and logs
every term per epoch; it never branches on a method's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distributed import World, average_
from kdbench.errors import KdbenchError

if TYPE_CHECKING:
    from kdbench.spec import RunSpec

KD_TEMPERATURE = 4.0  # Hinton KD temperature of the crd and semckd protocols (RepDistiller's train_student.py --kd_T)
# "batchmean": KL summed over classes, mean over the batch (RepDistiller, SemCKD, mdistiller); "mean": mean over
# batch and classes, i.e. batchmean / C (nn.KLDivLoss() in the TAKD and DGKD code).
KL_REDUCTIONS = ("batchmean", "mean")
# The schedule length the official codes (RepDistiller, mdistiller, SemCKD) set their epoch counts for on CIFAR-100,
# and, by the student's input side, on the other benchmarks: mdistiller's Tiny-ImageNet DOT configs train 200 epochs,
# its ImageNet configs (and CRD's, torchvision's) 100.
OFFICIAL_EPOCHS = 240
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that capture CUDA graphs on a GPU
OFFICIAL_EPOCHS_BY_INPUT = {32: OFFICIAL_EPOCHS, 64: 200, 224: 100}
# The logit options every distillation method has: the loss is ce_weight·CE + kd_weight·T²·KL_T (+ its own terms).
LOGIT_OPTIONS: dict[str, Any] = {"ce_weight": 1.0, "kd_weight": 0.0, "temperature": KD_TEMPERATURE,
                                 "kl_reduction": "batchmean"}


@dataclass(frozen=True)
class Range:
    """The numbers an option may take: finite, at least ``low`` (above it when ``low_open``), at most ``high``.

    Declared per option in ``Method.ranges``, so that a value that makes no sense (a zero temperature, a negative
    or NaN weight) is rejected when the sweep is planned, not epochs into training.
    """

    low: float
    high: float = math.inf
    low_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high and (isinstance(value, int) or math.isfinite(value))

    def __str__(self) -> str:
        low = f"{'>' if self.low_open else '>='} {self.low:g}"
        return low if self.high == math.inf else f"{low} and <= {self.high:g}"


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range(0, low_open=True), Range(0), Range(1)
# The ranges of LOGIT_OPTIONS: weights of loss terms are never negative, and T divides the logits.
LOGIT_RANGES: dict[str, Range] = {"ce_weight": NON_NEGATIVE, "kd_weight": NON_NEGATIVE, "temperature": POSITIVE}
# The crd and semckd protocols for a method whose own term is not logit KD: crd adds no KD (HobbitLong/RepDistiller
# scripts/run_cifar_distill.sh), semckd adds 1·KD_4 to every method (DefangChen/SemCKD scripts/run_cifar_distill.sh).
FEATURE_PRESETS: dict[str, dict[str, Any]] = {"crd": {"ce_weight": 1.0, "kd_weight": 0.0},
                                              "semckd": {"ce_weight": 1.0, "kd_weight": 1.0}}
# A method whose official code is RepDistiller's (or mdistiller's, which keeps its weights): official = crd.
REPDISTILLER_PRESETS: dict[str, dict[str, Any]] = {**FEATURE_PRESETS, "official": FEATURE_PRESETS["crd"]}


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = KD_TEMPERATURE, reduction: str = "batchmean") -> torch.Tensor:
    """Hinton's KD term ``T² · KL(σ(z_t/T) ‖ σ(z_s/T))`` in fp32 (Hinton et al. 2015, arXiv 1503.02531; batchmean
    as HobbitLong/RepDistiller ``distiller_zoo/KD.py::DistillKL``); ``reduction`` in KL_REDUCTIONS."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    return kl / student_logits.shape[1] if reduction == "mean" else kl


@dataclass(frozen=True)
class MethodContext:
    """What a method may know when it builds its auxiliary modules."""

    student_shapes: dict[str, tuple[int, ...]]  # tap name -> feature shape without batch (see models.taps)
    teacher_shapes: dict[str, tuple[int, ...]] | None  # None for methods that need no teacher
    protocol: str  # the loss-weight preset the options were resolved with (kdbench.spec.PROTOCOLS) or "none"
    batch_size: int
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)  # the method's resolved options (Method.defaults)
    seed: int = 0  # the run's seed, for method randomness drawn as a pure function of (seed, epoch, step)
    role: str = "student"  # "assistant" while a teacher assistant is trained (TAKD/DGKD chains)
    num_assistants: int = 0  # teacher assistants teaching this run besides the teacher
    num_train: int = 0  # training images (positions 0 .. num_train − 1 in StepOutputs.indices); 0: not known yet
    student: str = ""  # the student's zoo name (kdbench.models.model_entry), for rules that go by architecture
    fit_points: int | None = None  # the recipe's cap on the points of an offline fit (Preparation.fit_points)

    @classmethod
    def of_run(cls, spec: "RunSpec", num_classes: int, student_shapes: dict[str, tuple[int, ...]],
               teacher_shapes: dict[str, tuple[int, ...]] | None, num_train: int = 0) -> "MethodContext":
        """The context ``spec``'s method is built with: one definition for the harness and for plan-time checks. Its
        batch is what one process trains on: the global batch over the run's processes (SemCKD's official ImageNet
        code divides it so too)."""
        return cls(student_shapes, teacher_shapes, spec.protocol, spec.recipe.batch_size // (spec.world_size or 1),
                   num_classes, dict(spec.method_options), spec.seed, spec.role, len(spec.assistants), num_train,
                   spec.student, spec.recipe.fit_points)


@dataclass(frozen=True)
class StepOutputs:
    """The forwards of one training step, handed to :meth:`Method.losses`."""

    labels: torch.Tensor
    student_logits: torch.Tensor
    student_features: dict[str, torch.Tensor]
    teacher_logits: torch.Tensor | None = None  # computed under no_grad
    teacher_features: dict[str, torch.Tensor] | None = None
    # Forwarded teacher assistants by chain position (1 = largest); only those `trainers_for_step` asked for.
    assistant_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0  # 0-indexed, as the harness counts (loss warm-ups: DKD, ReviewKD); an init stage's are negative
    # Each sample's position in the training set (0 .. MethodContext.num_train − 1; the dataset index when the recipe
    # takes every image), int64 on the device: methods with per-sample state index it (CRD's memory banks).
    indices: torch.Tensor | None = None
    stage: str = "main"  # "init" during a method's InitStage
    # The method's extra augmented views of the batch (Method.views): view name -> (student logits, teacher logits,
    # the latter under no_grad; None where the teacher was not forwarded this step).
    views: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def trainer_logits(self, index: int) -> torch.Tensor:
        """Logits of trainer ``index``: 0 is the teacher, k the k-th teacher assistant."""
        return self.teacher_logits if index == 0 else self.assistant_logits[index]


@dataclass(frozen=True)
class InitStage:
    """A stage that trains before the recipe's epochs, as RepDistiller's ``helper/pretrain.py::init`` (AB and FSP
    initialise the student's features, FT its paraphraser): ``epochs`` of SGD at the constant ``lr`` over
    ``parameters`` (momentum and weight decay from the recipe), the method's ``losses`` called with ``out.stage`` =
    "init". As ``init`` does (``model_s.eval()``, then ``train()`` on the trained modules), the student runs in eval
    mode except its ``student_train_modules``, so no other BatchNorm of the student moves its running statistics
    before the main stage; the method's own modules are in train mode. ``frozen_after``: modules that stay fixed from
    the first main epoch on (FT's paraphraser)."""

    epochs: int
    parameters: tuple[nn.Parameter, ...]
    lr: float
    frozen_after: tuple[nn.Module, ...] = ()
    student_train_modules: tuple[nn.Module, ...] = ()


@dataclass(frozen=True)
class Preparation:
    """What :meth:`Method.prepare` may use before training: the frozen teacher, the data, a cache."""

    teacher: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # x -> (logits, teacher_taps)
    train_batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # pass -> augmented (x, y)
    plain_batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # every training image, un-augmented
    cache_dir: Path  # beside the teacher's run: artefacts fitted once per teacher, shared by its students
    device: torch.device
    fit_points: int | None = None  # the recipe's cap on points of an offline fit (k-means, LDA); None: all
    train_labels: torch.Tensor | None = None  # class of every training position (StepOutputs.indices), on the device
    teacher_model: nn.Module | None = None  # the frozen teacher itself (eval mode): read it, never change it


class Method(nn.Module):
    """Base class of every distillation method; subclasses live one per file in ``methods/``."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    # Tap names (see kdbench.models.taps) whose features the harness hands to `losses`.
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    # Methods whose modules depend on the batch size (SemCKD) skip a smaller last batch.
    needs_full_batches: ClassVar[bool] = False
    # The fewest images a training batch may hold (ReviewKD: a BatchNorm on a 1x1 map needs two in train mode).
    min_batch: ClassVar[int] = 1
    # Methods taught along a teacher-assistant chain (TAKD, DGKD): the sweep trains the chain first.
    uses_assistants: ClassVar[bool] = False
    # A caveat every results row of the method carries (column `method_note`), e.g. "reconstruction".
    note: ClassVar[str] = ""
    # A documented deviation from the method's official code, in one line (OFD's eval-mode teacher, SAKD's
    # reconstruction): the report flags the method's rows with it (kdbench.report.flags). Where it is the method's
    # caveat, `note` is the same text.
    deviation: ClassVar[str] = ""
    # The frozen trainers' BatchNorms normalise each training step's batch with its own statistics (their running
    # statistics untouched) instead of the running ones; an instance may set it from an option (OFD).
    teacher_batch_stats: bool = False
    # What the student learns from, for reports that group methods (column `method_family`): "logit" (output
    # distributions), "feature" (intermediate maps), "relation" (relations between samples, positions or layers),
    # "assistant" (through teacher assistants), "layer-adding" (a module the deployed student keeps), "baseline".
    family: ClassVar[str] = "other"
    # Augmented views of each batch besides the standard one, by name (kdbench.loader.VIEWS: "strong", crop + flip +
    # RandAugment + Cutout, as MLKD trains); the harness forwards the student and the teacher (when active) on each
    # and hands their logits to `losses` in StepOutputs.views.
    views: ClassVar[tuple[str, ...]] = ()
    # Why the method cannot train under torch.compile (every --compile mode), or under CUDA graphs only (modes
    # reduce-overhead and max-autotune): the plan refuses such runs in one line. "" where it can (a GPU test compares
    # compiled with eager: tests/test_compile.py).
    breaks_compile: ClassVar[str] = ""
    breaks_cuda_graphs: ClassVar[str] = ""
    # Tunable options and their defaults, loss weights and temperature included (LOGIT_OPTIONS); users override
    # them with `--set METHOD.KEY=VALUE`.
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"kl_reduction": KL_REDUCTIONS}  # options that take a few values
    ranges: ClassVar[dict[str, Range]] = LOGIT_RANGES  # numeric options' valid values; keys without a range: any
    # protocol name -> the option values that protocol sets (kdbench.spec.PROTOCOLS). Every method
    # with a teacher has one preset per protocol; "official" is the method as its own official code runs it.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # True where logit KD is the method itself (kd, takd, dgkd): report labels then add no "(+KD)".
    logit_kd: ClassVar[bool] = False
    # Options counted in epochs (an init stage, a loss warm-up) whose official values are set for the official
    # codes' 240-epoch schedule; a recipe of E epochs scales their defaults by E/240 (see `resolve_options`).
    epoch_options: ClassVar[tuple[str, ...]] = ()
    # The processes that train this run together (kdbench.distributed); the harness sets it.
    world: World = World()

    @classmethod
    def pair_defaults(cls, teacher: str | None, student: str) -> dict[str, Any]:
        """Options that the method's official configs set for this pair (e.g. letKD's α for ResNet50 -> MobileNetV2);
        they apply under every protocol, and the user's ``--set`` still wins."""
        return {}

    @classmethod
    def refusal(cls, compile_mode: str | None) -> str:
        """Why the plan refuses a run of this method compiled with ``compile_mode`` (None: eager), in one line; ""
        when it can train so."""
        reason = cls.breaks_compile or (cls.breaks_cuda_graphs if compile_mode in CUDA_GRAPH_MODES else "")
        if compile_mode is None or not reason:
            return ""
        fallback = "" if cls.breaks_compile else ", or with --compile default or max-autotune-no-cudagraphs"
        return f"{cls.name} cannot train under --compile {compile_mode}: {reason}; train it eagerly{fallback}"

    @classmethod
    def deviation_of(cls, options: dict[str, str]) -> str:
        """The documented deviation of a run with ``options`` (as its results rows write them: ``method_options``,
        values as text), "" where it runs as the official code does: ``deviation``, unless an option decides it."""
        return cls.deviation

    @classmethod
    def resolve_options(cls, overrides: dict[str, Any], protocol: str = "none", teacher: str | None = None,
                        student: str | None = None, epochs: int | None = None) -> tuple[tuple[str, Any], ...]:
        """Defaults, then the protocol's preset, then the pair's defaults, then ``epoch_options`` scaled to a recipe
        of ``epochs`` (None: as official), then user overrides (strings are converted to the default's type), each
        checked against ``choices`` and ``ranges``; sorted, hashable."""
        options = {**cls.defaults, **cls.presets.get(protocol, {}),
                   **(cls.pair_defaults(teacher, student) if student else {})}
        if epochs is not None:
            schedule = official_epochs(student)
            options.update({key: scaled_epochs(options[key], epochs, schedule) for key in cls.epoch_options})
        for key, value in overrides.items():
            if key not in cls.defaults:
                valid = ", ".join(cls.defaults) or "none"
                raise KdbenchError(f"method {cls.name} has no option {key!r}; its options: {valid}")
            options[key] = _convert(value, cls.defaults[key], f"{cls.name}.{key}") if isinstance(value, str) else value
        for key, value in options.items():
            if key in cls.choices and value not in cls.choices[key]:
                raise KdbenchError(f"option {cls.name}.{key} is one of {', '.join(map(str, cls.choices[key]))}; "
                                   f"got {value!r}")
            if key in cls.ranges and value not in cls.ranges[key]:
                kind = "an integer" if type(cls.defaults[key]) is int else "a finite number"
                raise KdbenchError(f"option {cls.name}.{key} must be {kind} {cls.ranges[key]}; got {value!r}")
        return tuple(sorted(options.items()))

    @classmethod
    def label(cls, options: dict[str, Any]) -> str:
        """What a leaderboard calls a run: the name, and ``(+KD)`` when the loss adds logit KD to the method's own
        terms (the semckd protocol's convention: Chen et al., AAAI 2021, and the DefangChen/SemCKD README report
        every feature method with logit KD added)."""
        return f"{cls.name} (+KD)" if not cls.logit_kd and options.get("kd_weight", 0) > 0 else cls.name

    def attach(self, student: nn.Module) -> None:
        """Called once with the student before training. Methods that put layers into the student register
        forward hooks on its taps here (a hook that returns a tensor feeds it forward); see ``export``."""

    def prepare(self, prep: Preparation) -> None:
        """Fits what the method needs before the first epoch (e.g. a head on the frozen teacher).

        Runs once per run, never on resume: anything it fits must live in the method's state_dict. In a run across
        processes it runs on rank 0 alone, over whole batches, and the state it fitted is broadcast to the others
        (``kdbench.distributed.fit_once``): it must call no collective. Its wall time is recorded as
        ``prepare_s``.
        """

    def reused_fit_s(self) -> float:
        """Seconds that the artefacts ``prepare`` loaded from a cache took to fit when they were made. They are
        part of this result's end-to-end cost, as the teacher's training is; ``prepare_s`` holds only the load."""
        return 0.0

    def fit_metrics(self) -> dict[str, float]:
        """Run-level metrics about what ``prepare`` fitted (e.g. sample sizes), added to the run's record."""
        return {}

    def init_stage(self, student: nn.Module, base_lr: float) -> InitStage | None:
        """The stage this method trains before the recipe's epochs, if any (built once, with the student and its
        base lr); its epochs run, checkpoint and resume as the main ones do, and count in the run's cost."""
        return None

    def trainers_for_step(self, epoch: int, step: int) -> tuple[int, ...]:
        """The frozen trainers to forward this step (0 = teacher, k = k-th assistant); called before `losses`."""
        return (0,)

    def __init__(self, ctx: MethodContext):
        super().__init__()
        self.ctx = ctx

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """Named, weighted scalar loss terms; their sum is what the student minimises."""
        raise NotImplementedError

    def step(self, optimizer: torch.optim.Optimizer, terms: dict[str, torch.Tensor]) -> None:
        """One update of the trained parameters from this step's loss terms: the gradient of their sum, through the
        run's optimiser (the recipe's SGD). A method that owns its update overrides it (DOT splits the task and
        distillation gradients); it reads the optimiser's param groups (lr, momentum, weight decay as the schedule
        sets them) and keeps any state of its own in its state dict, so that a run resumes."""
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        self.average_gradients([p.grad for group in optimizer.param_groups for p in group["params"]])
        optimizer.step()

    def average_gradients(self, gradients: list[torch.Tensor | None]) -> None:
        """Averages this step's ``gradients`` in place over the processes of a run trained by several
        (``kdbench.distributed``), as DDP's all-reduce does; nothing in one process. A method that computes its
        gradients itself (``step`` overridden) calls it on them before its update."""
        average_(gradients, self.world)

    def extra_params_train(self) -> int:
        """Trainable parameters beyond the student's, used only while training."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_params_inference(self) -> int:
        """Parameters the method adds to the deployed student (0 unless it changes the student)."""
        return 0

    def export(self, student: nn.Module) -> nn.Module:
        """The model deployed after training: the student itself, unless the method leaves layers in it."""
        return student

    @staticmethod
    def cross_entropy(out: StepOutputs) -> torch.Tensor:
        return F.cross_entropy(out.student_logits.float(), out.labels)

    def logit_terms(self, out: StepOutputs, trainer: int = 0) -> dict[str, torch.Tensor]:
        """``ce_weight·CE`` and ``kd_weight·KD_T`` against trainer ``trainer`` (0 = the teacher), from the options;
        a term whose weight is 0 is left out, so the logged terms say what the loss contains."""
        options = self.ctx.options
        terms = {}
        if options["ce_weight"]:
            terms["ce"] = options["ce_weight"] * self.cross_entropy(out)
        if options["kd_weight"]:
            terms["kd"] = options["kd_weight"] * kd_divergence(out.student_logits, out.trainer_logits(trainer),
                                                               options["temperature"], options["kl_reduction"])
        return terms


def official_epochs(student: str | None) -> int:
    """The official schedule that a pair's epoch counts are set for, by its student's input side (a model kdbench does
    not know: CIFAR-100's)."""
    from kdbench.models import model_entry

    try:
        size = model_entry(student).input_size if student else None
    except KdbenchError:
        size = None
    return OFFICIAL_EPOCHS_BY_INPUT.get(size, OFFICIAL_EPOCHS)


def scaled_epochs(official: int, epochs: int, schedule: int = OFFICIAL_EPOCHS) -> int:
    """An official count of epochs (set for a ``schedule``-epoch schedule) in a recipe of ``epochs``: in proportion,
    at least one epoch unless the official count is 0. A 6-epoch recipe runs AB's 30-epoch init stage for 1 epoch, not
    5× its own length, and DKD's 20-epoch warm-up reaches the full weight in epoch 1 (round(0.5) = 0, so 1)."""
    return max(1, round(official * epochs / schedule)) if official else 0


def _convert(text: str, default: Any, name: str) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return type(default)(text)
    except ValueError:
        raise KdbenchError(f"option {name} takes a {type(default).__name__}, got {text!r}") from None
