"""The method contract: what a distillation method declares and returns.

Modelled on mdistiller's ``Distiller``: a method is an ``nn.Module`` holding its auxiliary modules
(regressors, attention, ...) and returns a dict of named, already weighted loss terms for a batch. The
harness sums the terms, optimises the student and the method's parameters with one optimiser, and logs
every term per epoch; it never branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError

KD_TEMPERATURE = 4.0  # Hinton KD temperature used by every kdbench method and protocol (methods.md §0.2)


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = KD_TEMPERATURE) -> torch.Tensor:
    """Hinton's KD term ``T² · KL(σ(z_t/T) ‖ σ(z_s/T))``, batch mean, computed in fp32 (methods.md §0.2)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@dataclass(frozen=True)
class MethodContext:
    """What a method may know when it builds its auxiliary modules."""

    student_shapes: dict[str, tuple[int, ...]]  # tap name -> feature shape without batch (see models.taps)
    teacher_shapes: dict[str, tuple[int, ...]] | None  # None for methods that need no teacher
    protocol: str  # loss-weight protocol: "semckd", "crd" (methods.md §0.3) or "none"
    batch_size: int
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)  # the method's resolved options (Method.defaults)
    seed: int = 0  # the run's seed, for method randomness drawn as a pure function of (seed, epoch, step)
    role: str = "student"  # "assistant" while a teacher assistant is trained (TAKD/DGKD chains)
    num_assistants: int = 0  # teacher assistants teaching this run besides the teacher


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

    def trainer_logits(self, index: int) -> torch.Tensor:
        """Logits of trainer ``index``: 0 is the teacher, k the k-th teacher assistant."""
        return self.teacher_logits if index == 0 else self.assistant_logits[index]


@dataclass(frozen=True)
class Preparation:
    """What :meth:`Method.prepare` may use before training: the frozen teacher, the data, a cache."""

    teacher: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # x -> (logits, teacher_taps)
    train_batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # pass -> augmented (x, y)
    cache_dir: Path  # beside the teacher's run: artefacts fitted once per teacher, shared by its students
    device: torch.device


class Method(nn.Module):
    """Base class of every distillation method; subclasses live one per file in ``methods/``."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    # Tap names (see kdbench.models.taps) whose features the harness hands to `losses`.
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    # Methods whose modules depend on the batch size (SemCKD) skip a smaller last batch.
    needs_full_batches: ClassVar[bool] = False
    # Methods taught along a teacher-assistant chain (TAKD, DGKD): the sweep trains the chain first.
    uses_assistants: ClassVar[bool] = False
    # A caveat every results row of the method carries (column `method_note`), e.g. "reconstruction".
    note: ClassVar[str] = ""
    # Tunable options and their defaults; users override them with `--set METHOD.KEY=VALUE`.
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}  # the valid values of options that take a few

    @classmethod
    def resolve_options(cls, overrides: dict[str, str]) -> tuple[tuple[str, Any], ...]:
        """Defaults with user overrides (strings, converted to the default's type); sorted, hashable."""
        options = dict(cls.defaults)
        for key, text in overrides.items():
            if key not in cls.defaults:
                valid = ", ".join(cls.defaults) or "none"
                raise KdbenchError(f"method {cls.name} has no option {key!r}; its options: {valid}")
            options[key] = _convert(text, cls.defaults[key], f"{cls.name}.{key}")
            if key in cls.choices and options[key] not in cls.choices[key]:
                raise KdbenchError(f"option {cls.name}.{key} is one of {', '.join(map(str, cls.choices[key]))}; "
                                   f"got {text!r}")
        return tuple(sorted(options.items()))

    def attach(self, student: nn.Module) -> None:
        """Called once with the student before training. Methods that put layers into the student register
        forward hooks on its taps here (a hook that returns a tensor feeds it forward); see ``export``."""

    def prepare(self, prep: Preparation) -> None:
        """Fits what the method needs before the first epoch (e.g. a head on the frozen teacher).

        Runs once per run, never on resume: anything it fits must live in the method's state_dict.
        Its wall time is recorded as ``prepare_s``.
        """

    def reused_fit_s(self) -> float:
        """Seconds that the artefacts ``prepare`` loaded from a cache took to fit when they were made. They are
        part of this result's end-to-end cost, as the teacher's training is; ``prepare_s`` holds only the load."""
        return 0.0

    def trainers_for_step(self, epoch: int, step: int) -> tuple[int, ...]:
        """The frozen trainers to forward this step (0 = teacher, k = k-th assistant); called before `losses`."""
        return (0,)

    def __init__(self, ctx: MethodContext):
        super().__init__()
        self.ctx = ctx

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """Named, weighted scalar loss terms; their sum is what the student minimises."""
        raise NotImplementedError

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

    def logit_terms(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """CE, plus the logit-KD term that the semckd protocol adds to every method (methods.md §0.3)."""
        terms = {"ce": self.cross_entropy(out)}
        if self.ctx.protocol == "semckd":
            terms["kd"] = kd_divergence(out.student_logits, out.teacher_logits)
        return terms


def _convert(text: str, default: Any, name: str) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return type(default)(text)
    except ValueError:
        raise KdbenchError(f"option {name} takes a {type(default).__name__}, got {text!r}") from None
