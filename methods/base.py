"""The method contract: what a distillation method declares and returns.

Modelled on mdistiller's ``Distiller``: a method is an ``nn.Module`` holding its auxiliary modules
(regressors, attention, ...) and returns a dict of named, already weighted loss terms for a batch. The
harness sums the terms, optimises the student and the method's parameters with one optimiser, and logs
every term per epoch; it never branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

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


@dataclass(frozen=True)
class StepOutputs:
    """The forwards of one training step, handed to :meth:`Method.losses`."""

    labels: torch.Tensor
    student_logits: torch.Tensor
    student_features: dict[str, torch.Tensor]
    teacher_logits: torch.Tensor | None = None  # computed under no_grad
    teacher_features: dict[str, torch.Tensor] | None = None


class Method(nn.Module):
    """Base class of every distillation method; subclasses live one per file in ``methods/``."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    # Tap names (see kdbench.models.taps) whose features the harness hands to `losses`.
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    # Methods whose modules depend on the batch size (SemCKD) skip a smaller last batch.
    needs_full_batches: ClassVar[bool] = False
    # Tunable options and their defaults; users override them with `--set METHOD.KEY=VALUE`.
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def resolve_options(cls, overrides: dict[str, str]) -> tuple[tuple[str, Any], ...]:
        """Defaults with user overrides (strings, converted to the default's type); sorted, hashable."""
        options = dict(cls.defaults)
        for key, text in overrides.items():
            if key not in cls.defaults:
                valid = ", ".join(cls.defaults) or "none"
                raise KdbenchError(f"method {cls.name} has no option {key!r}; its options: {valid}")
            options[key] = _convert(text, cls.defaults[key], f"{cls.name}.{key}")
        return tuple(sorted(options.items()))

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
