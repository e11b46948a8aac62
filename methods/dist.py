"""``dist``: Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(arXiv 2205.10536).

KL matching asks the student for the teacher's exact probabilities, which a much stronger teacher makes hard; DIST
asks only for the same *relations*, measured by Pearson correlation, which is invariant to a shift and a positive
scale of either side. On the softmaxes ``Y = softmax(Z/τ)`` of a batch (B × C):

- inter-class relation: ``1 − mean_b ρ(Y_s[b, :], Y_t[b, :])``, each sample's class distribution;
- intra-class relation: ``1 − mean_c ρ(Y_s[:, c], Y_t[:, c])``, each class's scores over the batch;

with ``ρ(a, b) = ⟨a − ā, b − b̄⟩ / (‖a − ā‖·‖b − b̄‖ + 1e-8)``, and ``DIST = τ²·(β·inter + γ·intra)``.

Official code hunto/DIST_KD (its ``classification`` submodule, hunto/image_classification_sota):
``lib/models/losses/dist_kd.py`` (the loss) and ``lib/models/losses/kd_loss.py`` (``dist_t4``: β = γ = 1, τ = 4);
its CIFAR-100 config ``configs/strategies/distill/dist_cifar.yaml`` weighs CE by 1 and DIST by 2, so the objective
is ``CE + 2·DIST`` with β = γ = 1, which kdbench writes as ``ce_weight`` 1, ``beta`` = ``gamma`` = 2, τ 4 (the
``temperature`` option). DIST is itself the logit term, so every protocol resolves to that objective, as for DKD:
the semckd protocol's added KD_4 would count the KD signal twice. ``kl_reduction`` applies only to a logit KD term
a user adds with ``kd_weight``. The config's recipe is RepDistiller's (240 epochs, lr 0.05 ×0.1 at 150/180/210,
batch 64, weight decay 5e-4; lr 0.01 for MobileNet/ShuffleNet students, as kdbench's models set).

On several processes (kdbench.distributed) the intra-class correlation is over each process's shard, and the loss is the
mean over the processes: as DIST_KD's own ImageNet training (DDP) computes it on each process's local batch.
"""

from __future__ import annotations

import torch

from kdbench.methods import register_method
from kdbench.methods.base import LOGIT_OPTIONS, NON_NEGATIVE, Method, StepOutputs

PEARSON_EPS = 1e-8  # added to the product of the norms (dist_kd.py::cosine_similarity)
DIST_OBJECTIVE = {"ce_weight": 1.0, "kd_weight": 0.0}  # CE + DIST, no separate logit KD


def pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − mean over rows of ρ(a[i], b[i])``: the Pearson correlation of each row pair, centred over dim 1."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    rho = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + PEARSON_EPS)
    return 1 - rho.mean()


def dist_relations(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inter, intra)``, each scaled by τ², in fp32: the relation distances between the softmaxes of the batch, per
    sample (rows) and per class (columns)."""
    y_s = (student_logits.float() / temperature).softmax(dim=1)
    y_t = (teacher_logits.detach().float() / temperature).softmax(dim=1)
    scale = temperature**2
    return scale * pearson_distance(y_s, y_t), scale * pearson_distance(y_s.t(), y_t.t())


@register_method
class DIST(Method):
    """``ce_weight·CE + τ²·(β·inter + γ·intra)`` (Huang et al., NeurIPS 2022; hunto/DIST_KD); the same objective
    under every protocol."""

    name = "dist"
    family = "logit"
    logit_kd = True
    defaults = {**LOGIT_OPTIONS, **DIST_OBJECTIVE, "beta": 2.0, "gamma": 2.0}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE}
    presets = {"official": DIST_OBJECTIVE, "crd": DIST_OBJECTIVE, "semckd": DIST_OBJECTIVE}

    def losses(self, out: StepOutputs):
        options = self.ctx.options
        inter, intra = dist_relations(out.student_logits, out.teacher_logits, options["temperature"])
        terms = self.logit_terms(out)
        for term, value, weight in (("inter", inter, options["beta"]), ("intra", intra, options["gamma"])):
            if weight:  # as logit_terms: a term whose weight is 0 is left out
                terms[term] = weight * value
        return terms
