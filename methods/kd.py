"""``kd``: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).

The student matches the teacher's temperature-softened class distribution: ``T²·KL`` batch mean,
T = 4 (methods.md §1). Weights follow the run's protocol: crd ``0.1·CE + 0.9·KD``
(HobbitLong/RepDistiller scripts), semckd ``CE + KD`` (DefangChen/SemCKD scripts).
"""

from __future__ import annotations

import torch

from kdbench.methods import register_method
from kdbench.methods.base import KD_TEMPERATURE, Method, StepOutputs, kd_divergence

# protocol -> (CE weight, KD weight); TAKD and DGKD reuse them for every trainer
WEIGHTS = {"crd": (0.1, 0.9), "semckd": (1.0, 1.0)}


@register_method
class KD(Method):
    name = "kd"
    defaults = {"temperature": KD_TEMPERATURE}

    def kd_terms(self, out: StepOutputs, trainer_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        w_ce, w_kd = WEIGHTS[self.ctx.protocol]
        kd = kd_divergence(out.student_logits, trainer_logits, self.ctx.options["temperature"])
        return {"ce": w_ce * self.cross_entropy(out), "kd": w_kd * kd}

    def losses(self, out: StepOutputs):
        return self.kd_terms(out, out.teacher_logits)
