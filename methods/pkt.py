"""``pkt``: probabilistic knowledge transfer.

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018
(arXiv 1803.10837); code HobbitLong/RepDistiller ``distiller_zoo/PKT.py::PKT.cosine_similarity_loss`` (from the
authors' passalis/probabilistic_kt) and megvii-research/mdistiller ``mdistiller/distillers/PKT.py::pkt_loss``.

The student matches the conditional distribution over neighbours that cosine similarity induces in the batch:
``x̂ = x/(‖x‖₂ + ε)``, ``S = (x̂x̂ᵀ + 1)/2``, ``P = S / rowsum(S)`` (self-similarity included), and
``L_PKT = mean_{i,j} P_t·log((P_t + ε)/(P_s + ε))`` with ε = 1e-7: a mean over all B² entries, not a per-row sum.
The reference zeroes NaNs by in-place masking; here ``torch.nan_to_num`` does it out of place, and the norm is
``torch.linalg.vector_norm``, whose gradient at an all-zero feature is 0 (the reference's ``sqrt(Σx²)`` gives NaN).

Batch dependence: in-batch, and ≈ 1/B of a per-row KL, so the weight 30000 is tuned for B = 64; it needs B ≥ 2
(at B = 1 the term is 0).

Presets: official and crd ``CE + 30000·L_PKT`` (HobbitLong/RepDistiller ``scripts/run_cifar_distill.sh``,
``-a 0 -b 30000``; mdistiller ``PKT.LOSS.FEAT_WEIGHT 30000``); semckd ``CE + KD_4 + 30000·L_PKT``
(DefangChen/SemCKD ``scripts/run_cifar_distill.sh``).

On several processes (kdbench.distributed) the similarity distributions are over each process's shard, and the loss is
the mean over the processes: as mdistiller computes PKT inside its DataParallel forward, per GPU chunk. RepDistiller
trains on one GPU, over the whole batch.
"""

from __future__ import annotations

import torch

from kdbench.methods import register_method
from kdbench.methods.base import LOGIT_OPTIONS, NON_NEGATIVE, REPDISTILLER_PRESETS, Method, StepOutputs

TAP = "pooled"
EPS = 1e-7  # PKT.cosine_similarity_loss(eps=0.0000001)


def neighbour_probabilities(x: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` row-stochastic matrix of cosine similarities rescaled to [0, 1], in fp32."""
    x = x.float().flatten(1)
    x = torch.nan_to_num(x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + EPS), nan=0.0)
    similarity = (x @ x.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``mean_{i,j} P_t·log((P_t + ε)/(P_s + ε))``; the teacher side is computed without gradient."""
    with torch.autocast(device_type=f_s.device.type, enabled=False):  # fp32 Gram matrices, also under autocast
        p_s = neighbour_probabilities(f_s)
        with torch.no_grad():
            p_t = neighbour_probabilities(f_t)
        return (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()


@register_method
class PKT(Method):
    """KL between the in-batch cosine-neighbour distributions of teacher and student pooled features (Passalis &
    Tefas, ECCV 2018; HobbitLong/RepDistiller ``distiller_zoo/PKT.py``). Batch-dependent: needs B ≥ 2."""

    name = "pkt"
    family = "relation"
    student_taps = teacher_taps = (TAP,)
    defaults = {**LOGIT_OPTIONS, "beta": 30000.0}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    def losses(self, out: StepOutputs):
        return {**self.logit_terms(out), "pkt": self.ctx.options["beta"] * pkt_loss(out.student_features[TAP],
                                                                                   out.teacher_features[TAP])}
