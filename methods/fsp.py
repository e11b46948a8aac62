"""``fsp``: flow of solution procedure, used (as RepDistiller uses it) to initialise the student.

Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
Learning", CVPR 2017 (no arXiv version). As in HobbitLong/RepDistiller (``distiller_zoo/FSP.py::FSP``,
``helper/pretrain.py::init``, ``train_student.py`` branch ``fsp``):

- Init stage (``init_epochs``, 30 at 240 epochs, in proportion otherwise):
  SGD at the student's base lr (constant) over the student's feature modules
  minimises ``L_FSP`` alone. For consecutive taps (g_i, g_{i+1}) of ``stem, stage1..stageK`` the larger map is
  average-pooled to the smaller's size and ``G[b, j, k] = mean_x g_{i+1}[b, j, x]·g_i[b, k, x]`` (the "flow"
  matrix, C_{i+1} × C_i); ``L_FSP = Σ_i mean (G_s − G_t)²``. The student's and the teacher's matrices must have the
  same size: both models need the same number of stages and equal channel counts at the stem and every stage
  (vgg13→vgg8, resnet32x4→resnet8x4, wrn_40_2→wrn_16_2, resnet56/110→resnet20/32), other pairs raise at build time.
  ``bmm`` replaces RepDistiller's broadcast product (the same sums, without a B×C×C×HW tensor).
- Main stage: ``logit_terms`` only, i.e. plain CE under official/crd (RepDistiller ``-a 0 -b 50``: β has no effect,
  so there is no β option) and ``CE + KD_4`` under semckd (kdbench's choice; SemCKD has no FSP).

The init stage trains RepDistiller's ``get_feat_modules`` in train mode, the rest of the student in eval mode, as
``ab``'s. Deviations: the teacher is forwarded in the main stage only for a KD term, and
``init_epochs`` scales with the recipe (30 at 240 epochs).

On several processes (kdbench.distributed) the init stage trains each process's shard with the gradients averaged, as
the main stage; FSP matrices are per sample, so only BatchNorm (per process unless ``--sync-bn``) sees the shard.
RepDistiller trains FSP on one GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.ab import INIT_STAGE_GRADIENTS, feature_stage, teacher_in_init_stage
from kdbench.methods.at import pool_to_smaller
from kdbench.methods.base import (
    LOGIT_OPTIONS,
    NON_NEGATIVE,
    REPDISTILLER_PRESETS,
    InitStage,
    Method,
    MethodContext,
    StepOutputs,
)
from kdbench.models.taps import stage_names


def flow_matrices(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """``G[b, j, k] = mean_x top[b, j, x]·bottom[b, k, x]`` for every consecutive (bottom, top), (B, C_top, C_bottom);
    the map with the larger height is average-pooled to the other's size first."""
    grams = []
    for bottom, top in zip(features, features[1:]):
        bottom, top = pool_to_smaller(bottom, top)
        positions = top.shape[2] * top.shape[3]
        grams.append(torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / positions)
    return grams


@register_method
class FSP(Method):
    """Flow (inter-layer Gram) matrices between consecutive stages, trained in an init stage (Yim et al., CVPR 2017;
    RepDistiller ``distiller_zoo/FSP.py``)."""

    name = "fsp"
    family = "relation"
    breaks_cuda_graphs = INIT_STAGE_GRADIENTS
    epoch_options = ("init_epochs",)
    defaults = {**LOGIT_OPTIONS, "init_epochs": 30}
    ranges = {**Method.ranges, "init_epochs": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.student_taps = ("stem", *stage_names(ctx.student_shapes))
        self.teacher_taps = ("stem", *stage_names(ctx.teacher_shapes))
        channels_s = [ctx.student_shapes[tap][0] for tap in self.student_taps]
        channels_t = [ctx.teacher_shapes[tap][0] for tap in self.teacher_taps]
        if channels_s != channels_t:
            raise KdbenchError(f"fsp needs the same channels at the stem and every stage of both models; the student "
                               f"has {channels_s}, the teacher {channels_t}")

    def init_stage(self, student: nn.Module, base_lr: float) -> InitStage:
        parameters, modules = feature_stage(student)
        return InitStage(self.ctx.options["init_epochs"], parameters, base_lr, student_train_modules=modules)

    def trainers_for_step(self, epoch: int, step: int) -> tuple[int, ...]:
        return teacher_in_init_stage(self.ctx, epoch)

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        if out.stage == "main":
            return self.logit_terms(out)
        with torch.autocast(out.student_logits.device.type, enabled=False):
            g_s = flow_matrices([out.student_features[tap].float() for tap in self.student_taps])
            g_t = flow_matrices([out.teacher_features[tap].detach().float() for tap in self.teacher_taps])
            loss = sum((s - t).pow(2).mean() for s, t in zip(g_s, g_t))
        return {"fsp": loss}
