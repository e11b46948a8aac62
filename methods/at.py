"""``at``: attention transfer.

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional Neural
Networks via Attention Transfer", ICLR 2017 (arXiv 1612.03928). As in the CIFAR-100 benchmark code
(HobbitLong/RepDistiller ``distiller_zoo/AT.py::Attention``; megvii-research/mdistiller
``mdistiller/distillers/AT.py::single_stage_at_loss``): at every stage the student matches the teacher's spatial
attention map ``a(F) = normalize_2(mean_c F^p)`` (``p`` = 2, L2 over the positions), so channel counts may differ;
the spatially larger map is average-pooled to the smaller first. ``L_AT = Σ_stages mean_{b,hw} (a(F_s) − a(F_t))²``:
the authors' code form (channel mean, squared difference averaged over B·HW), not the paper's equation (channel sum,
un-squared distance, β/2); the CIFAR-100 benchmark numbers come from the code form.

Stages ``stage1..stageK`` of both, paired shallow to deep (RepDistiller ``train_student.py`` zips ``feat[1:-1]``).
Presets: official and crd ``CE + 1000·L_AT`` (RepDistiller ``scripts/run_cifar_distill.sh`` ``-a 0 -b 1000``;
mdistiller ``AT.LOSS.FEAT_WEIGHT``), semckd ``CE + KD_4 + 1000·L_AT`` (DefangChen/SemCKD
``scripts/run_cifar_distill.sh`` ``-a 1 -b 1000``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.methods import register_method
from kdbench.methods.base import (
    AT_LEAST_ONE,
    LOGIT_OPTIONS,
    NON_NEGATIVE,
    REPDISTILLER_PRESETS,
    Method,
    MethodContext,
    StepOutputs,
)
from kdbench.models.taps import stage_names


def paired_stages(ctx: MethodContext) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Student and teacher stage taps paired shallow to deep, the first min(K_s, K_t) of each (RepDistiller's
    ``zip(feat_s[1:-1], feat_t[1:-1])``); AT, NST and KDSVD share it."""
    student, teacher = stage_names(ctx.student_shapes), stage_names(ctx.teacher_shapes)
    depth = min(len(student), len(teacher))
    return tuple(student[:depth]), tuple(teacher[:depth])


def tap_pairs(method: Method, out: StepOutputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The method's (student, teacher) tap pairs in fp32, the teacher's detached."""
    return [(out.student_features[s].float(), out.teacher_features[t].detach().float())
            for s, t in zip(method.student_taps, method.teacher_taps)]


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pools the map with the larger height to the other's size (RepDistiller compares heights)."""
    if f_s.shape[2] > f_t.shape[2]:
        return F.adaptive_avg_pool2d(f_s, f_t.shape[2:]), f_t
    if f_s.shape[2] < f_t.shape[2]:
        return f_s, F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
    return f_s, f_t


def attention_map(feature: torch.Tensor, p: int) -> torch.Tensor:
    """``normalize_2(mean_c F^p)``, shape (B, H·W)."""
    return F.normalize(feature.pow(p).mean(dim=1).flatten(1), dim=1, eps=1e-12)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: int) -> torch.Tensor:
    """One stage's ``mean_{b,hw} (a(F_s) − a(F_t))²``."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method
class AT(Method):
    """Attention maps at every stage (Zagoruyko & Komodakis, ICLR 2017; RepDistiller ``distiller_zoo/AT.py``)."""

    name = "at"
    family = "feature"
    defaults = {**LOGIT_OPTIONS, "beta": 1000.0, "p": 2}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "p": AT_LEAST_ONE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.student_taps, self.teacher_taps = paired_stages(ctx)

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        p = self.ctx.options["p"]
        with torch.autocast(out.student_logits.device.type, enabled=False):
            loss = sum(at_loss(f_s, f_t, p) for f_s, f_t in tap_pairs(self, out))
        return {**self.logit_terms(out), "at": self.ctx.options["beta"] * loss}
