"""The modules and optimisers of one run, as ``kdbench.harness`` assembles them, and their resumable state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdbench.methods.base import InitStage
from kdbench.models.taps import FeatureExtractor
from kdbench.results import RunRecord


@dataclass
class Parts:
    """The modules and optimiser of one run."""

    student: torch.nn.Module
    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    base_lr: float
    student_fx: FeatureExtractor
    # Frozen models that teach this run: index 0 the teacher, k the k-th teacher assistant.
    trainers: list[torch.nn.Module] = field(default_factory=list)
    trainer_fx: list[FeatureExtractor] = field(default_factory=list)
    trainer_records: list[RunRecord] = field(default_factory=list)
    init_stage: InitStage | None = None  # the method's stage before the recipe's epochs, with its own optimiser
    init_optimizer: torch.optim.Optimizer | None = None

    @property
    def init_epochs(self) -> int:
        return self.init_stage.epochs if self.init_stage else 0

    def optimizer_of(self, stage: str) -> torch.optim.Optimizer:
        return self.init_optimizer if stage == "init" else self.optimizer

    def state(self) -> dict:
        return {"student": self.student.state_dict(), "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "init_optimizer": self.init_optimizer.state_dict() if self.init_optimizer else None}

    def load_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.init_optimizer is not None:
            self.init_optimizer.load_state_dict(state["init_optimizer"])
