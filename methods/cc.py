"""``cc``: correlation congruence, in the form of the RepDistiller code (not the paper's formula).

Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019 (arXiv 1904.01802). The paper matches
inter-instance correlation matrices (a Gaussian-kernel Taylor expansion); the CIFAR-100 benchmark runs the code the
authors shared with RepDistiller (HobbitLong/RepDistiller ``distiller_zoo/CC.py::Correlation``), a much simpler
in-batch term, and kdbench implements that code (the method's ``note`` says so on every results row).

Two linear embeddings without normalisation (``models/util.py::LinearEmbed``, ``--feat_dim 128``) map the student's
and the teacher's pooled features to ``e_s``, ``e_t``; both are trained with the student (``train_student.py``, branch
``correlation``). With ``δ = |e_s − e_t|`` the loss is ``L_CC = 1/(B−1) · Σ_{b<B} Σ_d δ[b, d] · δ[b+1, d]``.
It is trivially lowered by shrinking both embeddings, so it acts as a weak regulariser: reference behaviour, kept.

Batch dependence: the term pairs consecutive samples in the loader's order, so it needs B ≥ 2 (a batch of one
has no pair and contributes 0, where the reference code returns NaN).

Presets: official and crd ``CE + 0.02·L_CC`` (HobbitLong/RepDistiller ``scripts/run_cifar_distill.sh``, ``-a 0 -b
0.02``); semckd ``CE + KD_4 + 0.02·L_CC`` (DefangChen/SemCKD ``scripts/run_cifar_distill.sh``).

On several processes (kdbench.distributed) the correlations pair consecutive samples of each process's shard, and the
loss is the mean over the processes. CC's official code (RepDistiller) trains on one GPU and has no multi-GPU form; per
shard is kdbench's choice, as for the other relation losses.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.methods import register_method
from kdbench.methods.base import AT_LEAST_ONE, LOGIT_OPTIONS, NON_NEGATIVE, REPDISTILLER_PRESETS, Method, StepOutputs

TAP = "pooled"


def correlation_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """``Σ_{b<B} Σ_d δ[b,d]·δ[b+1,d] / (B−1)`` with ``δ = |e_s − e_t|``, in fp32; 0 for a batch of one."""
    delta = (e_s.float() - e_t.float()).abs()
    return (delta[:-1] * delta[1:]).sum() / max(delta.shape[0] - 1, 1)


@register_method
class CC(Method):
    """Consecutive-pair congruence of linearly embedded pooled features (RepDistiller's code version of Peng et al.,
    ICCV 2019). Batch-dependent: needs B ≥ 2."""

    name = "cc"
    family = "relation"
    note = deviation = "RepDistiller code version (distiller_zoo/CC.py), not the paper's formula"
    student_taps = teacher_taps = (TAP,)
    defaults = {**LOGIT_OPTIONS, "beta": 0.02, "embed_dim": 128}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "embed_dim": AT_LEAST_ONE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx):
        super().__init__(ctx)
        dim = int(ctx.options["embed_dim"])
        self.embed_s = nn.Linear(ctx.student_shapes[TAP][0], dim)
        self.embed_t = nn.Linear(ctx.teacher_shapes[TAP][0], dim)

    def losses(self, out: StepOutputs):
        e_s = self.embed_s(out.student_features[TAP].flatten(1))
        e_t = self.embed_t(out.teacher_features[TAP].detach().flatten(1))
        return {**self.logit_terms(out), "cc": self.ctx.options["beta"] * correlation_loss(e_s, e_t)}
