"""``semckd``: cross-layer distillation with semantic calibration.

Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021 (arXiv 2012.03236); official code
DefangChen/SemCKD (``models/util.py::SelfA``, ``distiller_zoo/SemCKD.py``). Every student stage is matched to
every teacher stage: a per-pair regressor maps the student map onto the teacher map, and a per-sample attention
over the teacher stages (query/key MLPs on the rows of the batch Gram matrices) weights the per-pair MSEs.
Loss: ``ce_weight·CE + kd_weight·KD_4 + β·L_sem`` with ``β = 400`` (DefangChen/SemCKD ``README.md``, CIFAR-100).
Presets: official and semckd ``CE + KD_4 + 400·L_sem`` (DefangChen/SemCKD ``scripts/run_cifar_distill.sh``,
``-r 1 -a 1 -b 400``); crd drops KD.

Batch-size dependence: the query/key MLPs take a Gram-matrix row of width ``B`` as input, so the auxiliary
module (its parameter count grows with ``B²``) is defined only for batches of exactly the configured size;
the harness therefore drops the smaller last batch of every epoch (``needs_full_batches``), as the official
training loop skips it.

On several processes (kdbench.distributed) the attention's Gram matrices, and the MLP whose input size is the batch, are
each process's shard's: the method is built for the global batch over the processes, as SemCKD's official ImageNet code
(DDP, ``opt.batch_size / ngpus_per_node``) builds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.methods import register_method
from kdbench.methods.base import FEATURE_PRESETS, LOGIT_OPTIONS, NON_NEGATIVE, Method, MethodContext, StepOutputs
from kdbench.models.taps import stage_names

EMBED_FACTOR = 4  # the MLP embedding width is B / 4 (official `factor = 4`)


class MLPEmbed(nn.Module):
    """``Linear(B → 2B/4) → ReLU → Linear(2B/4 → B/4) → L2-normalise`` (official ``MLPEmbed``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear2(F.relu(self.linear1(x.flatten(1))))
        return F.normalize(x, p=2.0, dim=1, eps=1e-12)


class AAEmbed(nn.Module):
    """Bias-free regressor ``1×1 → BN → ReLU → 3×3 → BN → ReLU → 1×1`` with ``2·C_t`` hidden channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = 2 * out_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, out_channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.regressor(x)


def gram(feature: torch.Tensor) -> torch.Tensor:
    """Unnormalised batch Gram matrix ``Q Qᵀ`` of the flattened feature, ``(B, B)``, in fp32."""
    flat = feature.float().flatten(1)
    return flat @ flat.t()


@register_method
class SemCKD(Method):
    """All student stages × all teacher stages, weighted by a learned per-sample attention (Chen et al., AAAI 2021;
    DefangChen/SemCKD ``models/util.py::SelfA``)."""

    name = "semckd"
    family = "feature"
    needs_full_batches = True
    defaults = {**LOGIT_OPTIONS, "beta": 400.0}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE}
    presets = {**FEATURE_PRESETS, "official": FEATURE_PRESETS["semckd"]}

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        if ctx.teacher_shapes is None:
            raise ValueError("semckd needs a teacher: MethodContext.teacher_shapes is None")
        self.batch_size = int(ctx.batch_size)
        if self.batch_size < EMBED_FACTOR:
            raise ValueError(f"semckd needs a batch size of at least {EMBED_FACTOR} (its attention MLPs embed a "
                             f"Gram-matrix row of width B into B/{EMBED_FACTOR}); got {self.batch_size}")
        self.beta = float(ctx.options["beta"])
        self.student_taps = tuple(stage_names(ctx.student_shapes))
        self.teacher_taps = tuple(stage_names(ctx.teacher_shapes))
        if not self.student_taps or not self.teacher_taps:
            raise ValueError(f"semckd needs stage taps; student has {list(ctx.student_shapes)}, "
                             f"teacher has {list(ctx.teacher_shapes)}")
        s_channels = [ctx.student_shapes[n][0] for n in self.student_taps]
        t_channels = [ctx.teacher_shapes[n][0] for n in self.teacher_taps]
        dim_in, dim_out = self.batch_size, self.batch_size // EMBED_FACTOR
        # Official names and registration order (key, query, regressor), so SemCKD `attention` state dicts load.
        for j in range(len(t_channels)):
            self.add_module(f"key_weight{j}", MLPEmbed(dim_in, dim_out))
        for i in range(len(s_channels)):
            self.add_module(f"query_weight{i}", MLPEmbed(dim_in, dim_out))
        for i, c_s in enumerate(s_channels):
            for j, c_t in enumerate(t_channels):
                self.add_module(self.regressor_name(i, j), AAEmbed(c_s, c_t))
        # Diagnostic: the last batch's mean attention (S, T); a plain attribute, not a buffer or parameter.
        self.mean_attention: torch.Tensor | None = None

    def regressor_name(self, i: int, j: int) -> str:
        """``regressor{i}{j}`` as in the official code (a separator only if indices could collide)."""
        if max(len(self.student_taps), len(self.teacher_taps)) > 10:
            return f"regressor{i}_{j}"
        return f"regressor{i}{j}"

    def regressor(self, i: int, j: int) -> AAEmbed:
        return self.get_submodule(self.regressor_name(i, j))

    def attention(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor]) -> torch.Tensor:
        """``a[b, i, j] = softmax_j ⟨q_i[b], k_j[b]⟩``, shape ``(B, S, T)``; all in fp32 (autocast off)."""
        with torch.autocast(device_type=feat_s[0].device.type, enabled=False):
            query = torch.stack([getattr(self, f"query_weight{i}")(gram(f)) for i, f in enumerate(feat_s)], dim=1)
            key = torch.stack([getattr(self, f"key_weight{j}")(gram(f)) for j, f in enumerate(feat_t)], dim=2)
            return torch.softmax(torch.bmm(query, key), dim=-1)

    def pair_values(self, i: int, j: int, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Regressed student map and matching target for pair (i, j): the larger map is pooled to the smaller."""
        s_hw, t_hw = tuple(f_s.shape[-2:]), tuple(f_t.shape[-2:])
        if s_hw[0] > t_hw[0]:
            return self.regressor(i, j)(F.adaptive_avg_pool2d(f_s, t_hw)), f_t
        return self.regressor(i, j)(f_s), F.adaptive_avg_pool2d(f_t, s_hw)

    def pair_losses(self, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor]) -> torch.Tensor:
        """``ℓ[b, i, j]``: per-sample MSE (mean over C, H, W) of every pair, shape ``(B, S, T)``, fp32."""
        rows = []
        for i, f_s in enumerate(feat_s):
            row = []
            for j, f_t in enumerate(feat_t):
                value, target = self.pair_values(i, j, f_s, f_t)
                row.append((value.float() - target.float()).pow(2).flatten(1).mean(dim=1))
            rows.append(torch.stack(row, dim=1))
        return torch.stack(rows, dim=1)

    def semckd_loss(self, student_features: dict[str, torch.Tensor],
                    teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unweighted ``L_sem = Σ_b Σ_i Σ_j a[b,i,j] · ℓ[b,i,j] / (B·S)`` (DefangChen/SemCKD
        ``distiller_zoo/SemCKD.py::SemCKDLoss``)."""
        feat_s = [student_features[n] for n in self.student_taps]
        feat_t = [teacher_features[n].detach() for n in self.teacher_taps]
        sizes = {f.shape[0] for f in (*feat_s, *feat_t)}
        if sizes != {self.batch_size}:
            raise ValueError(f"semckd is built for batches of exactly {self.batch_size} samples (its attention "
                             f"MLPs take Gram-matrix rows of that width); got batch size(s) {sorted(sizes)}. "
                             "Drop the smaller last batch (the harness does: needs_full_batches).")
        attention = self.attention(feat_s, feat_t)
        loss = (attention * self.pair_losses(feat_s, feat_t)).sum() / (self.batch_size * len(feat_s))
        self.mean_attention = attention.detach().mean(dim=0)
        return loss

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        if out.teacher_features is None:
            raise ValueError("semckd needs the teacher's features")
        if out.student_logits.shape[0] != self.batch_size:
            raise ValueError(f"semckd is built for batches of exactly {self.batch_size} samples; got "
                             f"{out.student_logits.shape[0]}. Drop the smaller last batch (needs_full_batches).")
        return {**self.logit_terms(out), "semckd": self.beta * self.semckd_loss(out.student_features,
                                                                                out.teacher_features)}
