"""``kdsvd``: self-supervised knowledge distillation with singular value decomposition.

Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018
(arXiv 1807.06819). As in the CIFAR-100 benchmark code (HobbitLong/RepDistiller ``distiller_zoo/KDSVD.py::KDSVD``,
``k = 1``): each stage's map, as a matrix ``X``, is compressed to its dominant right singular vectors, and the
student matches the RBF-kernel relation between the vectors of consecutive stages.

- ``X`` (``layout``): ``repdistiller`` (default) takes (B, H·W, C), vectors over the channels;
  ``mdistiller`` (megvii-research/mdistiller ``mdistiller/distillers/KDSVD.py::svd``) takes (B, C·H, W), vectors
  over the width: a different, much smaller loss, offered to reproduce that code.
- ``torch.linalg.svd(X)``; non-finite values set to 0. The teacher keeps its top ``k`` right singular vectors, the
  student its top ``k + 3``, each L2-normalised, and the first ``k`` teacher singular values L2-normalised (σ̂;
  1 for ``k`` = 1).
- Alignment: for each teacher vector the student vector of largest |cosine|, times the cosine's sign; both sides
  are then scaled by σ̂. This product needs equal columns (channels, or widths under ``mdistiller``) at every
  stage: other pairs raise at build time.
- For each stage i ≥ 2: ``R[b,p,q,j] = exp(−(v_i[b,p,j] − v_{i−1}[b,q,j])² / 8)``;
  ``L_KDSVD = Σ_i Σ (R_s − R_t)² / B``, non-finite entries set to 0 (the gradient through nearly equal singular
  values is not finite).
- The gradient that flows back through the student's SVD is made finite the same way (non-finite entries set to
  0). Repeated singular values (a map with dead channels or positions, common after ReLU; certain when H·W < C, as
  at resnet20's 7×7 × 64 stage on 28×28 inputs) give it inf/NaN entries; the reference only cleans the forward,
  so one such batch writes NaN into the student's weights and the next SVD fails on non-finite input (all three
  seeds of resnet56 → resnet20 on Fashion-MNIST did, within two epochs). On maps without repeated singular values
  the gradient is the reference's, unchanged.

Stages ``stage1..stageK`` of both, paired shallow to deep (RepDistiller ``train_student.py`` zips ``feat[1:-1]``).
Presets: RepDistiller's scripts list no KDSVD; official and crd ``CE + 1·L_KDSVD`` (mdistiller
``mdistiller/engine/cfg.py``: ``KDSVD.K 1``, ``LOSS.CE_WEIGHT 1``, ``LOSS.FEAT_WEIGHT 1``), semckd
``CE + KD_4 + 1·L_KDSVD`` (kdbench's choice: the crd weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.at import paired_stages, tap_pairs
from kdbench.methods.base import (
    AT_LEAST_ONE,
    LOGIT_OPTIONS,
    NON_NEGATIVE,
    REPDISTILLER_PRESETS,
    Method,
    MethodContext,
    StepOutputs,
)

# layout -> the axis of a (C, H, W) map whose entries the right singular vectors run over
LAYOUTS = {"repdistiller": 0, "mdistiller": 2}
EXTRA_STUDENT_VECTORS = 3  # the student keeps k + 3 candidates for the alignment
RBF_SCALE = 8.0


def finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with non-finite entries set to 0 (the reference's ``removenan``)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def svd_matrix(feature: torch.Tensor, layout: str) -> torch.Tensor:
    """The matrix whose right singular vectors are transferred: (B, H·W, C) or, ``mdistiller``, (B, C·H, W)."""
    b, c, h, w = feature.shape
    return feature.reshape(b, c, h * w).transpose(1, 2) if layout == "repdistiller" else feature.reshape(b, c * h, w)


def top_singular(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` right singular vectors (B, D, n), each L2-normalised, and the first ``n`` singular values,
    L2-normalised together (B, n)."""
    if x.requires_grad:  # the student's side: see the module docstring on the gradient
        x.register_hook(finite)
    _, values, vh = torch.linalg.svd(x, full_matrices=False)
    vectors = finite(vh.transpose(1, 2))[:, :, :n]
    return F.normalize(vectors, dim=1, eps=1e-12), F.normalize(finite(values)[:, :n], dim=1, eps=1e-12)


def align(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine| times that cosine's sign (B, D, k)."""
    cosine = v_s.transpose(1, 2) @ v_t
    best = cosine.abs().amax(dim=1, keepdim=True)
    return v_s @ torch.where(cosine.abs() == best, cosine.sign(), torch.zeros_like(cosine))


def rbf(v: torch.Tensor, v_before: torch.Tensor) -> torch.Tensor:
    """``exp(−(v[b,p,j] − v_before[b,q,j])² / 8)``, shape (B, D_i, D_{i−1}, k)."""
    return torch.exp(-(v.unsqueeze(2) - v_before.unsqueeze(1)).pow(2) / RBF_SCALE)


def kdsvd_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]], k: int, layout: str) -> torch.Tensor:
    """``Σ_{i≥2} Σ (R_s − R_t)² / B`` over consecutive stage pairs (teacher maps detached by the caller)."""
    total, before = 0.0, None
    for f_s, f_t in pairs:
        v_t, sigma = top_singular(svd_matrix(f_t, layout), k)
        v_s, _ = top_singular(svd_matrix(f_s, layout), k + EXTRA_STUDENT_VECTORS)
        v_s, v_t = align(v_s, v_t) * sigma.unsqueeze(1), v_t * sigma.unsqueeze(1)
        if before is not None:
            total = total + finite((rbf(v_s, before[0]) - rbf(v_t, before[1])).pow(2)).sum()
        before = v_s, v_t
    return total / pairs[0][0].shape[0]


@register_method
class KDSVD(Method):
    """RBF relation of consecutive stages' singular vectors (Lee, Kim & Song, ECCV 2018; RepDistiller
    ``distiller_zoo/KDSVD.py``)."""

    name = "kdsvd"
    family = "relation"
    defaults = {**LOGIT_OPTIONS, "beta": 1.0, "k": 1, "layout": "repdistiller"}
    choices = {**Method.choices, "layout": tuple(LAYOUTS)}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "k": AT_LEAST_ONE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.student_taps, self.teacher_taps = paired_stages(ctx)
        if len(self.student_taps) < 2:
            raise KdbenchError(f"kdsvd relates consecutive stages and needs two stage taps in both models; they share "
                               f"{len(self.student_taps)}")
        layout = ctx.options["layout"]
        axis = LAYOUTS[layout]
        for s, t in zip(self.student_taps, self.teacher_taps):
            c_s, c_t = ctx.student_shapes[s][axis], ctx.teacher_shapes[t][axis]
            if c_s != c_t:
                what = "channels" if axis == 0 else "widths"
                raise KdbenchError(f"kdsvd (layout={layout}) needs the student's and the teacher's {what} equal at "
                                   f"every stage; {s}: student {c_s}, teacher {c_t}")

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        options = self.ctx.options
        with torch.autocast(out.student_logits.device.type, enabled=False):
            loss = kdsvd_loss(tap_pairs(self, out), options["k"], options["layout"])
        return {**self.logit_terms(out), "kdsvd": options["beta"] * loss}
