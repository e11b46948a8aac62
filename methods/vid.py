"""``vid``: variational information distillation.

Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information Distillation for Knowledge Transfer", CVPR 2019
(arXiv 1904.05835); code HobbitLong/RepDistiller ``distiller_zoo/VID.py::VIDLoss`` (from the authors'
ssahn0215/variational-information-distillation) and megvii-research/mdistiller ``mdistiller/distillers/VID.py``.

Maximises a variational lower bound on the mutual information between teacher and student features: at every
stage (the first min(S, T) of each model, paired shallow to deep as RepDistiller's ``zip``), a Gaussian whose mean
is regressed from the student map (``1×1 C_s→C_t, ReLU, 1×1, ReLU, 1×1``, bias-free) and whose per-channel variance
``σ²_c = softplus(log_scale_c) + 1e-5`` is learned (initialised to 5) must explain the teacher map; the loss is its
negative log-likelihood ``mean_{b,c,h,w} ½((μ − F_t)²/σ²_c + log σ²_c)`` summed over stages, the larger map
average-pooled to the smaller's size first. It can be negative (the ``log σ²`` term).

The variances: RepDistiller trains them with the student (its criterion is in ``trainable_list``, so weight decay
acts on them too), the default here (``learn_variance`` true). mdistiller keeps them in a plain list, never
registered nor optimised, so they stay at 5 for the whole run: ``learn_variance=false`` reproduces that (a buffer).

Presets: official and crd ``CE + 1·L_VID`` (HobbitLong/RepDistiller ``scripts/run_cifar_distill.sh``, ``-a 0 -b 1``;
mdistiller ``VID.LOSS.FEAT_WEIGHT 1``); semckd ``CE + KD_4 + 1·L_VID`` (DefangChen/SemCKD
``scripts/run_cifar_distill.sh``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.methods import register_method
from kdbench.methods.base import LOGIT_OPTIONS, NON_NEGATIVE, REPDISTILLER_PRESETS, Method, StepOutputs
from kdbench.models.taps import stage_names

INIT_VARIANCE = 5.0  # RepDistiller VIDLoss(init_pred_var=5.0)
VARIANCE_EPS = 1e-5  # RepDistiller VIDLoss(eps=1e-5): floor of every variance


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class VIDStage(nn.Module):
    """One stage's Gaussian: regressed mean and per-channel variance (names as RepDistiller's ``VIDLoss``)."""

    def __init__(self, c_s: int, c_t: int, learn_variance: bool):
        super().__init__()
        self.regressor = nn.Sequential(conv1x1(c_s, c_t), nn.ReLU(), conv1x1(c_t, c_t), nn.ReLU(), conv1x1(c_t, c_t))
        # softplus⁻¹(5 − eps), so that softplus(log_scale) + eps = 5
        log_scale = torch.full((c_t,), math.log(math.expm1(INIT_VARIANCE - VARIANCE_EPS)))
        if learn_variance:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale.float()) + VARIANCE_EPS

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Unweighted negative log-likelihood of the teacher map, mean over batch, channels and positions."""
        if f_s.shape[-2] > f_t.shape[-2]:  # RepDistiller compares heights
            f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[-2:])
        elif f_s.shape[-2] < f_t.shape[-2]:
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])
        mean = self.regressor(f_s).float()
        var = self.variance().reshape(1, -1, 1, 1)
        return 0.5 * ((mean - f_t.float()).pow(2) / var + var.log()).mean()


@register_method
class VID(Method):
    """Per-stage Gaussian negative log-likelihood of the teacher maps given the student maps (Ahn et al., CVPR 2019;
    HobbitLong/RepDistiller ``distiller_zoo/VID.py``). Not batch-dependent."""

    name = "vid"
    family = "feature"
    defaults = {**LOGIT_OPTIONS, "beta": 1.0, "learn_variance": True}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx):
        super().__init__(ctx)
        s_stages, t_stages = stage_names(ctx.student_shapes), stage_names(ctx.teacher_shapes)
        depth = min(len(s_stages), len(t_stages))
        self.student_taps, self.teacher_taps = tuple(s_stages[:depth]), tuple(t_stages[:depth])
        self.stages = nn.ModuleList(
            VIDStage(ctx.student_shapes[s][0], ctx.teacher_shapes[t][0], bool(ctx.options["learn_variance"]))
            for s, t in zip(self.student_taps, self.teacher_taps))

    def losses(self, out: StepOutputs):
        vid = sum(stage(out.student_features[s], out.teacher_features[t].detach())
                  for stage, s, t in zip(self.stages, self.student_taps, self.teacher_taps))
        return {**self.logit_terms(out), "vid": self.ctx.options["beta"] * vid}
