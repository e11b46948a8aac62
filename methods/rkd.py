"""``rkd``: relational knowledge distillation (distance and angle).

Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv 1904.05068); code HobbitLong/RepDistiller
``distiller_zoo/RKD.py::RKDLoss`` and megvii-research/mdistiller ``mdistiller/distillers/RKD.py::rkd_loss``.

The student reproduces the geometry of the batch in the pooled features. Distance term: pairwise Euclidean
distances ``d_ij = sqrt(max(‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩, 1e-12))`` with a zero diagonal, divided by the mean of the
positive ones (the teacher's under no_grad; the student's mean carries gradient), compared by SmoothL1 (β = 1) over
all B² entries. Angle term: ``A_ijk = ⟨e_ij, e_ik⟩`` with ``e_ij = normalize(x_j − x_i)`` (zero for i = j),
SmoothL1 over all B³ entries. ``L_RKD = 25·L_d + 50·L_a``; the two are logged as separate terms.

Batch dependence: entirely in-batch; it needs B ≥ 3 (at B = 2 both terms are identically 0; a batch of one has no
pair and contributes 0, where the reference code returns NaN). Memory: a B×B×D difference tensor and B³ angles.

Presets: official and crd ``CE + 1·L_RKD`` (HobbitLong/RepDistiller ``scripts/run_cifar_distill.sh``, ``-a 0 -b 1``;
mdistiller ``RKD.DISTANCE_WEIGHT 25``, ``ANGLE_WEIGHT 50``, ``LOSS.FEAT_WEIGHT 1``); semckd ``CE + KD_4 + 1·L_RKD``
(DefangChen/SemCKD ``scripts/run_cifar_distill.sh``).

On several processes (kdbench.distributed) the distances and angles are over each process's shard, and the loss is the
mean over the processes: as mdistiller computes RKD inside its DataParallel forward, per GPU chunk. RepDistiller trains
on one GPU, over the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.methods import register_method
from kdbench.methods.base import LOGIT_OPTIONS, NON_NEGATIVE, REPDISTILLER_PRESETS, Method, StepOutputs

TAP = "pooled"
DISTANCE_EPS = 1e-12  # floor of squared distances before the square root (RKDLoss.pdist eps)


def normalized_distances(x: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` Euclidean distances with a zero diagonal, divided by the mean of the positive ones."""
    square = x.pow(2).sum(dim=1)
    d = (square[:, None] + square[None, :] - 2 * x @ x.t()).clamp(min=DISTANCE_EPS).sqrt()
    d = torch.where(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0, d)
    # the mean of the positive entries; off the diagonal they are ≥ 1e-6, so the clamp only turns a batch of one
    # (no pair) into zeros instead of 0/0
    mean = d.sum() / (d > 0).sum().clamp(min=1)
    return d / mean.clamp(min=DISTANCE_EPS)


def angles(x: torch.Tensor) -> torch.Tensor:
    """``(B, B, B)``: ``A[i, j, k] = ⟨e_ij, e_ik⟩``, ``e_ij`` the unit vector from ``x_i`` to ``x_j`` (0 for i = j)."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2))


@register_method
class RKD(Method):
    """Distance- and angle-wise relations of the pooled features inside the batch (Park et al., CVPR 2019;
    HobbitLong/RepDistiller ``distiller_zoo/RKD.py``). Batch-dependent: needs B ≥ 3."""

    name = "rkd"
    family = "relation"
    student_taps = teacher_taps = (TAP,)
    defaults = {**LOGIT_OPTIONS, "beta": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "distance_weight": NON_NEGATIVE, "angle_weight": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    def losses(self, out: StepOutputs):
        """``beta·distance_weight·L_d`` and ``beta·angle_weight·L_a``; a term of weight 0 is neither computed nor
        logged."""
        options = self.ctx.options
        terms = self.logit_terms(out)
        student = out.student_features[TAP].float().flatten(1)
        teacher = out.teacher_features[TAP].detach().float().flatten(1)
        relations = {"rkd_distance": (options["distance_weight"], normalized_distances),
                     "rkd_angle": (options["angle_weight"], angles)}
        # fp32 throughout: the ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩ cancellation would be lost in a half-precision matmul
        with torch.autocast(device_type=student.device.type, enabled=False):
            for term, (weight, relation) in relations.items():
                if weight and options["beta"]:
                    with torch.no_grad():
                        target = relation(teacher)
                    terms[term] = options["beta"] * weight * F.smooth_l1_loss(relation(student), target)
        return terms
