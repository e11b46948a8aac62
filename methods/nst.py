"""``nst``: neuron selectivity transfer.

Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv 1707.01219 (preprint).
As in the CIFAR-100 benchmark code (HobbitLong/RepDistiller ``distiller_zoo/NST.py::NSTLoss`` with ``full_loss``;
megvii-research/mdistiller ``mdistiller/distillers/NST.py::single_stage_nst_loss``): at every stage the distribution
of the channels' spatial activation patterns is matched by a maximum mean discrepancy under the kernel
``k(u, v) = ⟨u, v⟩²``. The larger map is average-pooled to the smaller, each channel's spatial vector is
L2-normalised, and ``ℓ = mean k(t_i, t_j) + mean k(s_i, s_j) − 2·mean k(s_i, t_j)`` (means over B·C_t², B·C_s²,
B·C_s·C_t); ``L_NST = Σ_stages ℓ``. The kernels are batched matrix products (the reference broadcasts a
B×C×C×HW tensor; same values, far less memory).

Stages ``stage1..stageK`` of both, paired shallow to deep (RepDistiller ``train_student.py`` zips ``feat[1:-1]``).
Presets: official and crd ``CE + 50·L_NST`` (RepDistiller ``scripts/run_cifar_distill.sh`` ``-a 0 -b 50``;
mdistiller ``NST.LOSS.FEAT_WEIGHT``), semckd ``CE + KD_4 + 50·L_NST`` (DefangChen/SemCKD lists no NST: the crd
weight, kdbench's choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.methods import register_method
from kdbench.methods.at import paired_stages, pool_to_smaller, tap_pairs
from kdbench.methods.base import LOGIT_OPTIONS, NON_NEGATIVE, REPDISTILLER_PRESETS, Method, MethodContext, StepOutputs


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_{b,i,j} ⟨a_i, b_j⟩²`` of (B, C, N) tensors, by one batched matrix product."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """One stage's squared MMD between the student's and the teacher's channel patterns."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    s = F.normalize(f_s.flatten(2), dim=2, eps=1e-12)
    t = F.normalize(f_t.flatten(2), dim=2, eps=1e-12)
    return poly_kernel_mean(t, t) + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)


@register_method
class NST(Method):
    """Polynomial-kernel MMD at every stage (Huang & Wang, arXiv 1707.01219; RepDistiller ``distiller_zoo/NST.py``)."""

    name = "nst"
    family = "feature"
    defaults = {**LOGIT_OPTIONS, "beta": 50.0}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.student_taps, self.teacher_taps = paired_stages(ctx)

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        with torch.autocast(out.student_logits.device.type, enabled=False):
            loss = sum(nst_loss(f_s, f_t) for f_s, f_t in tap_pairs(self, out))
        return {**self.logit_terms(out), "nst": self.ctx.options["beta"] * loss}
