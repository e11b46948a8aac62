"""``ab``: activation-boundary distillation, used (as RepDistiller uses it) to initialise the student.

Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons",
AAAI 2019 (arXiv 1811.03233). As in HobbitLong/RepDistiller (``distiller_zoo/AB.py::ABLoss``,
``models/util.py::Connector``, ``helper/pretrain.py::init``, ``train_student.py`` branch ``abound``):

- Init stage (``init_epochs``, 30 at 240 epochs, in proportion otherwise):
  SGD at the student's base lr (constant) over the connectors and the student's
  feature modules minimises ``L_AB`` alone. At stage i = 0..K−1 (``stage{i+1}_preact`` of both, paired shallow to
  deep), ``s`` = connector(student pre-activation), ``t`` = the teacher's, margin m = 1:
  ``ℓ_i = Σ_{b,c,h,w} (s + m)²·1[s > −m ∧ t ≤ 0] + (s − m)²·1[s ≤ m ∧ t > 0]`` (the student's neurons take the
  teacher's activation signs with a margin), ``L_AB = Σ_i 2^{i−K+1}·ℓ_i · 3 / (1000·B)``.
- Connectors: identity where channels and height agree, else ``ConvReg`` without its ReLU (conv + BN). They serve
  the init stage only and are frozen after it.
- Main stage: ``logit_terms`` only, i.e. plain CE under official/crd (RepDistiller ``-a 0 -b 1``, ``loss_kd = 0``:
  β has no effect, so there is no β option) and ``CE + KD_4`` under semckd (kdbench's choice; SemCKD has no AB).

The init stage trains what RepDistiller's ``get_feat_modules`` returns (``kdbench.models.feature_modules``): every
module but the head, and without WRN's final ``bn1``, MobileNetV2's ``conv2`` and ShuffleV2's ``conv2``/``bn2``; those
stay out of the init optimiser and in eval mode with the rest of the student (``InitStage.student_train_modules``),
so WRN's ``stage3_preact`` (that ``bn1``) is normalised with its running statistics, as in RepDistiller.

Deviations: models with different stage counts pair the first min(K_s, K_t) stages (RepDistiller
asserts equal counts), and a student map smaller than the teacher's by other than 2× uses ``ConvReg``'s fourth
branch (the teacher map pooled to the student's size; RepDistiller raises). In the main stage the teacher is
forwarded only for a KD term: RepDistiller's ``helper/loops.py::train_distill`` forwards it there for nothing, a
cost kdbench does not count. Like every option counted in epochs, ``init_epochs`` scales with the recipe
(30 at 240 epochs; ``Method.epoch_options``).

On several processes (kdbench.distributed) the init stage trains each process's shard with the gradients averaged, as
the main stage; its losses are per sample, so only BatchNorm (per process unless ``--sync-bn``) sees the shard.
RepDistiller trains AB on one GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.methods import register_method
from kdbench.methods.at import paired_stages
from kdbench.methods.base import (
    LOGIT_OPTIONS,
    NON_NEGATIVE,
    REPDISTILLER_PRESETS,
    InitStage,
    Method,
    MethodContext,
    StepOutputs,
)
from kdbench.methods.fitnet import ConvReg
from kdbench.models import feature_modules

# Why AB and FSP cannot train under CUDA graphs (Method.breaks_cuda_graphs); read from the code, to be confirmed on a
# GPU: the init stage's optimiser zeroes the gradients of the modules it trains only.
INIT_STAGE_GRADIENTS = ("its init stage steps only the feature modules, so the student's classifier keeps "
                        "accumulating gradients in memory that the CUDA graph of its backward owns and overwrites at "
                        "the next step")


def feature_stage(student: nn.Module) -> tuple[tuple[nn.Parameter, ...], tuple[nn.Module, ...]]:
    """The parameters and modules of the student's feature modules (RepDistiller's ``get_feat_modules``,
    ``kdbench.models.feature_modules``): what AB's and FSP's init stage trains, in train mode."""
    modules = feature_modules(student)
    return tuple(p for module in modules for p in module.parameters()), modules


def teacher_in_init_stage(ctx: MethodContext, epoch: int) -> tuple[int, ...]:
    """`Method.trainers_for_step` of a method that needs the teacher's features in its init stage only (AB, FSP):
    every init step, and a main step only for a logit-KD term (RepDistiller's main stage of AB/FSP is CE alone)."""
    return (0,) if epoch < 0 or ctx.options["kd_weight"] else ()


class Connector(ConvReg):
    """RepDistiller's ``ConvReg(use_relu=False)``: the FitNet regressor's conv and BN, no ReLU, so the connected
    map keeps its sign."""

    def forward(self, x):
        return self.bn(self.conv(x))


def boundary_loss(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """``Σ (s + m)²·1[s > −m ∧ t ≤ 0] + (s − m)²·1[s ≤ m ∧ t > 0]`` over every element (RepDistiller
    ``ABLoss.criterion_alternative_l2``)."""
    inactive = (s + margin).pow(2) * ((s > -margin) & (t <= 0))
    active = (s - margin).pow(2) * ((s <= margin) & (t > 0))
    return (inactive + active).sum()


@register_method
class AB(Method):
    """Activation boundaries at every stage, trained in an init stage (Heo et al., AAAI 2019; RepDistiller
    ``distiller_zoo/AB.py``)."""

    name = "ab"
    family = "feature"
    breaks_cuda_graphs = INIT_STAGE_GRADIENTS
    epoch_options = ("init_epochs",)
    defaults = {**LOGIT_OPTIONS, "init_epochs": 30, "margin": 1.0}
    ranges = {**Method.ranges, "init_epochs": NON_NEGATIVE, "margin": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        student, teacher = paired_stages(ctx)
        self.student_taps = tuple(f"{tap}_preact" for tap in student)
        self.teacher_taps = tuple(f"{tap}_preact" for tap in teacher)
        self.connectors = nn.ModuleList(
            nn.Identity() if s[:2] == t[:2] else Connector(s, t)
            for s, t in ((ctx.student_shapes[a], ctx.teacher_shapes[b])
                         for a, b in zip(self.student_taps, self.teacher_taps)))

    def init_stage(self, student: nn.Module, base_lr: float) -> InitStage:
        parameters, modules = feature_stage(student)
        return InitStage(self.ctx.options["init_epochs"], (*self.connectors.parameters(), *parameters), base_lr,
                         frozen_after=(self.connectors,), student_train_modules=modules)

    def trainers_for_step(self, epoch: int, step: int) -> tuple[int, ...]:
        return teacher_in_init_stage(self.ctx, epoch)

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        if out.stage == "main":
            return self.logit_terms(out)
        margin, depth = self.ctx.options["margin"], len(self.connectors)
        loss = 0.0
        for i, (connector, a, b) in enumerate(zip(self.connectors, self.student_taps, self.teacher_taps)):
            s, t = connector(out.student_features[a]).float(), out.teacher_features[b].detach().float()
            if isinstance(connector, Connector):
                t = connector.target(t)
            loss = loss + 2.0 ** (i - depth + 1) * boundary_loss(s, t, margin)
        return {"ab": loss * 3 / (1000 * out.labels.shape[0])}

    def extra_params_train(self) -> int:
        """The connectors, trained with the student in the init stage (frozen, and so uncounted by requires_grad,
        once the run ends)."""
        return sum(p.numel() for p in self.connectors.parameters())
