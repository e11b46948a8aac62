"""The method contract: what a distillation method declares and returns.

Modelled on mdistiller's ``Distiller``: a method is an ``nn.Module`` holding its auxiliary modules
(regressors, attention, ...) and returns a dict of named, already weighted loss terms for a batch. The
harness sums the terms, optimises the student and the method's parameters with one optimiser, and logs
every term per epoch; it never branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MethodContext:
    """What a method may know when it builds its auxiliary modules."""

    student_shapes: dict[str, tuple[int, ...]]  # tap name -> feature shape without batch (see models.taps)
    teacher_shapes: dict[str, tuple[int, ...]] | None  # None for methods that need no teacher
    protocol: str  # loss-weight protocol: "semckd", "crd" (methods.md §0.3) or "none"
    batch_size: int
    num_classes: int


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
