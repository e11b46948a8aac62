"""``sp``: similarity-preserving knowledge distillation.

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv 1907.09682). As in the CIFAR-100
benchmark code (HobbitLong/RepDistiller ``distiller_zoo/SP.py::Similarity.similarity_loss``; megvii-research/mdistiller
``mdistiller/distillers/SP.py::similarity_loss``): the student reproduces the teacher's B×B matrix of pairwise
similarities of the last stage's maps, so feature sizes may differ. ``Q = flatten(F)``, ``Ĝ = normalize_rows(QQᵀ)``,
``L_SP = ‖Ĝ_t − Ĝ_s‖²_F / B²`` (the code's shape-(1,) tensor reduced to a scalar).

Batch dependence: every row of Ĝ has unit norm, so ``L_SP ≤ 4/B`` and β = 3000 is tuned for B = 64. The smaller
last batch is kept, as RepDistiller's loader (``dataset/cifar100.py``, ``drop_last`` False) does.
Presets: official and crd ``CE + 3000·L_SP`` (RepDistiller ``scripts/run_cifar_distill.sh`` ``-a 0 -b 3000``;
mdistiller ``SP.LOSS.FEAT_WEIGHT``), semckd ``CE + KD_4 + 3000·L_SP`` (DefangChen/SemCKD
``scripts/run_cifar_distill.sh`` ``-a 1 -b 3000``).

On several processes (kdbench.distributed) the similarity matrices are each process's shard's, and the loss is the mean
over the processes: as mdistiller computes SP inside its DataParallel forward, per GPU chunk. RepDistiller trains on one
GPU, over the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.methods import register_method
from kdbench.methods.at import tap_pairs
from kdbench.methods.base import LOGIT_OPTIONS, NON_NEGATIVE, REPDISTILLER_PRESETS, Method, MethodContext, StepOutputs
from kdbench.methods.semckd import gram
from kdbench.models.taps import stage_names


def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``‖normalize_rows(G_t) − normalize_rows(G_s)‖²_F / B²`` of the batch Gram matrices."""
    batch = f_s.shape[0]
    diff = F.normalize(gram(f_t), dim=1, eps=1e-12) - F.normalize(gram(f_s), dim=1, eps=1e-12)
    return diff.pow(2).sum() / batch**2


@register_method
class SP(Method):
    """Batch similarity of the last stage (Tung & Mori, ICCV 2019; RepDistiller ``distiller_zoo/SP.py``)."""

    name = "sp"
    family = "relation"
    needs_full_batches = False  # batch-dependent, yet the reference keeps the smaller last batch
    defaults = {**LOGIT_OPTIONS, "beta": 3000.0}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.student_taps = (stage_names(ctx.student_shapes)[-1],)
        self.teacher_taps = (stage_names(ctx.teacher_shapes)[-1],)

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        with torch.autocast(out.student_logits.device.type, enabled=False):
            (f_s, f_t), = tap_pairs(self, out)
            loss = similarity_loss(f_s, f_t)
        return {**self.logit_terms(out), "sp": self.ctx.options["beta"] * loss}
