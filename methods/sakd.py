"""``sakd``: semantic-aware KD with parameter-free feature uniformization — a **reconstruction**.

Guo, Han, Wang, Zhang, Han, "Semantic-aware knowledge distillation with parameter-free feature uniformization",
Visual Intelligence 1, article 6 (2023), DOI 10.1007/s44267-023-00003-0.

**This is a reconstruction from the paper's abstract only** (at the DOI above; no public code is known). No
equation, table or code of the paper has been checked; every choice below is kdbench's, is a
``--set sakd.KEY=VALUE`` option, and every result of this method must be labelled a reconstruction. The abstract
names two components, both implemented here:

1. A parameter-free self-attention ``U`` that maps teacher and student feature maps of any channel count to
   vectors of one length, by the same function for both networks (no learned projection):

   - ``tokens = spatial`` (the only choice): tokens are spatial positions, so the channel axis disappears in
     ``X̂ X̂ᵀ`` and the result does not depend on the channel count or channel order.
   - ``stages = last``: each model's deepest stage output (``stageK``); ``all`` pairs the last ``min(K_s, K_t)``
     stages of both models from the deep end; a comma list such as ``2,3`` names stages by number (``k`` =
     ``stagek`` of both models, ``-k`` = the k-th deepest of each). Several stages: their vectors are concatenated.
   - spatial alignment: both maps are average-pooled (``adaptive_avg_pool2d``, one step) to
     ``(min(H_s, H_t, P), min(W_s, W_t, P))`` with ``pool_size`` ``P = 8``; ``N = h·w`` tokens.
   - ``row_norm = l2``: each token ``X[n] ∈ ℝ^C`` is L2-normalised (eps 1e-12); ``standardize`` z-scores it over
     the channels and divides by ``√C`` (``X̂ X̂ᵀ`` is then the Pearson correlation); ``none`` keeps the raw
     features (not scale-invariant).
   - ``tau_a = 1.0``: ``A = softmax_row(X̂ X̂ᵀ / τ_a) ∈ ℝ^{N×N}``, computed in fp32 with autocast off.
   - ``vector = full``: ``u = vec(A) ∈ ℝ^{N²}``; ``colmean``: ``u = (1/N)·1ᵀA ∈ ℝ^N`` (attention received).

2. A standalone feature-based classification branch ``g`` that reads the uniformized vectors and supplies
   class-level guidance:

   - ``head = linear``: ``Linear(len(u) → num_classes)``; ``mlp``: ``Linear → ReLU → Linear`` with
     ``head_hidden = 512`` hidden units.
   - ``head_input = scaled``: ``g`` reads each stage's vector times a fixed constant so that its entries average
     about 1 (``N·u`` for ``full`` and ``colmean``, whose entries average ``1/N``; ``√N·a`` for the branch-only
     vector below, which is unit-norm); ``raw`` feeds ``u`` unchanged. A fixed reparametrisation of ``g``
     [kdbench choice]; the feature-matching term always reads the unscaled ``u``.
   - ``head_mode = prefit_teacher``: before the first epoch (``Method.prepare``) ``g`` is fitted on the frozen
     teacher's ``u_T`` with cross-entropy for ``prefit_passes = 5`` passes over the augmented training set
     (Adam, ``prefit_lr = 0.001``, no weight decay [kdbench choice]), then frozen (``requires_grad = False``,
     from construction on, so a resumed run also keeps it frozen) and shared by both networks; it lives in the
     method's state_dict. It is refitted in every run (no cache), so its cost is in ``prepare_s``.
     ``joint``: ``g`` is trained with the student by the run's SGD, on ``CE(g(u_T), y)`` (term ``*_head_ce``,
     weight 1 [kdbench choice]) and on the student's terms; the KL target ``g(u_T)`` is detached there.

Objective, terms named as logged: the logit terms (``ce``, and ``kd`` = ``KD_4`` when ``kd_weight`` > 0,
``Method.logit_terms``) and

- ``sakd_kl``  = ``β · τ_b² · KL(σ(g(u_T)/τ_b) ‖ σ(g(u_S)/τ_b))``, ``beta = 1.0``, ``tau_b = 4.0``;
- ``sakd_ce``  = ``γ · CE(g(u_S), y)``, ``gamma = 0.1``;
- ``sakd_mse`` = ``δ · mean((u_S − u_T)²)``, ``delta = 0.0`` (the term is left out while δ = 0).

Presets: crd ``α_kd = 0``, semckd ``α_kd = 1``. There is no official code; "official" is the
reconstruction's crd form (no logit KD beside its own terms), the one it was designed around.

Ablation ``components`` (each gives its own set of terms and runs end to end):

- ``both`` (default): ``U`` and ``g`` as above: ``sakd_kl``, ``sakd_ce`` (+ ``sakd_mse`` if δ > 0).
- ``uniformization``: ``U`` only, no branch: ``sakd_mse`` with ``δ = 1`` while ``sakd.delta`` is left at 0
  (else ``sakd.delta``); no head, nothing to prefit.
- ``branch``: ``g`` only, without the self-attention: ``g`` reads a parameter-free, channel-agnostic
  *spatial-energy* vector of each aligned map, ``a = normalize_2(mean_c F²)`` over the ``N`` positions
  (Zagoruyko & Komodakis' attention map; same pooling as ``U``, so teacher and student lengths match):
  ``branch_kl``, ``branch_ce`` (+ ``branch_head_ce`` when joint). ``sakd.delta`` must be 0 here.

Teacher features are detached; gradients reach the student only through ``u_S``. ``U`` has no parameters or
buffers; ``g`` and everything else here is training-only and dropped at inference (``extra_params_inference =
0``, the deployed student is the plain model). ``extra_params_train`` counts ``g`` in joint mode only (a frozen
prefit head does not train). On several processes (kdbench.distributed) the prefit runs once, on rank 0, over whole
batches, and the other processes load its ``g``; ``U`` and the branch act per sample, so each process computes its
shard's terms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.base import (
    AT_LEAST_ONE,
    LOGIT_OPTIONS,
    NON_NEGATIVE,
    POSITIVE,
    REPDISTILLER_PRESETS,
    Method,
    MethodContext,
    Preparation,
    StepOutputs,
    kd_divergence,
)
from kdbench.models.taps import stage_names

COMPONENTS = ("both", "uniformization", "branch")
ROW_NORMS = ("l2", "standardize", "none")
VECTORS = ("full", "colmean")


def aligned_size(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], pool_size: int) -> tuple[int, int]:
    """The common token grid of a stage pair: the smaller spatial size of the two maps, capped at ``P×P``."""
    (_, h_s, w_s), (_, h_t, w_t) = student_shape, teacher_shape
    return min(h_s, h_t, pool_size), min(w_s, w_t, pool_size)


def pool_to(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Parameter-free spatial alignment: average-pool ``(B, C, H, W)`` down to ``size`` (never up)."""
    hw = tuple(feature.shape[-2:])
    if hw == tuple(size):
        return feature
    if size[0] > hw[0] or size[1] > hw[1]:
        raise ValueError(f"cannot pool a {hw[0]}x{hw[1]} map up to {size[0]}x{size[1]}")
    return F.adaptive_avg_pool2d(feature, size)


class Uniformization(nn.Module):
    """``U(F)``: parameter-free self-attention over spatial tokens, ``(B, C, H, W) -> (B, N²)`` or ``(B, N)``.

    The same module (hence the same function) serves teacher and student; it holds no parameters or buffers,
    and its output does not depend on ``C`` or on the order of the channels.
    """

    def __init__(self, row_norm: str = "l2", tau_a: float = 1.0, vector: str = "full"):
        super().__init__()
        if row_norm not in ROW_NORMS:
            raise KdbenchError(f"sakd.row_norm is one of {', '.join(ROW_NORMS)}; got {row_norm!r}")
        if vector not in VECTORS:
            raise KdbenchError(f"sakd.vector is one of {', '.join(VECTORS)}; got {vector!r}")
        if not tau_a > 0:
            raise KdbenchError(f"sakd.tau_a must be > 0; got {tau_a}")
        self.row_norm, self.tau_a, self.vector = row_norm, float(tau_a), vector

    def length(self, size: tuple[int, int]) -> int:
        n = size[0] * size[1]
        return n * n if self.vector == "full" else n

    def head_scale(self, size: tuple[int, int]) -> float:
        """Entries of ``u`` average ``1/N`` (rows of ``A`` sum to 1); ``N·u`` averages 1."""
        return float(size[0] * size[1])

    def tokens(self, feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``X̂``: the pooled map as ``(B, N, C)`` spatial tokens, row-normalised, fp32."""
        x = pool_to(feature.float(), size).flatten(2).transpose(1, 2)
        if self.row_norm == "l2":
            return F.normalize(x, p=2.0, dim=2, eps=1e-12)
        if self.row_norm == "standardize":
            centred = x - x.mean(dim=2, keepdim=True)
            return centred / (centred.pow(2).mean(dim=2, keepdim=True) + 1e-12).sqrt() / math.sqrt(x.shape[2])
        return x

    def attention(self, feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``A = softmax_row(X̂ X̂ᵀ / τ_a)``, ``(B, N, N)``, in fp32 with autocast off."""
        with torch.autocast(device_type=feature.device.type, enabled=False):
            x = self.tokens(feature, size)
            return torch.softmax(torch.bmm(x, x.transpose(1, 2)) / self.tau_a, dim=-1)

    def forward(self, feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        a = self.attention(feature, size)
        return a.flatten(1) if self.vector == "full" else a.mean(dim=1)


class SpatialEnergy(nn.Module):
    """Branch-only ablation: ``a = normalize_2(mean_c F²)`` over the ``N`` aligned positions, ``(B, N)``, fp32.

    Parameter-free and channel-agnostic like :class:`Uniformization`, but without the self-attention.
    """

    def length(self, size: tuple[int, int]) -> int:
        return size[0] * size[1]

    def head_scale(self, size: tuple[int, int]) -> float:
        """``a`` is unit-norm, so its entries have RMS ``1/√N``; ``√N·a`` has RMS 1."""
        return math.sqrt(size[0] * size[1])

    def forward(self, feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        with torch.autocast(device_type=feature.device.type, enabled=False):
            energy = pool_to(feature.float(), size).pow(2).mean(dim=1).flatten(1)
            return F.normalize(energy, p=2.0, dim=1, eps=1e-12)


def stage_pairs(spec: str, student_shapes: dict[str, tuple[int, ...]],
                teacher_shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    """``(student tap, teacher tap)`` per selected stage, from ``sakd.stages`` (``last``, ``all`` or ``2,3``/``-1``)."""
    s_names, t_names = stage_names(student_shapes), stage_names(teacher_shapes)
    if not s_names or not t_names:
        raise KdbenchError(f"sakd needs stage taps; student has {list(student_shapes)}, "
                           f"teacher has {list(teacher_shapes)}")
    text = str(spec).strip().lower()
    if text == "last":
        return [(s_names[-1], t_names[-1])]
    if text == "all":
        k = min(len(s_names), len(t_names))
        return list(zip(s_names[-k:], t_names[-k:]))
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise KdbenchError(f"sakd.stages is 'last', 'all' or comma-separated stage numbers (k = stagek of both "
                           f"models, -k = the k-th deepest of each); got {spec!r}") from None
    pairs, common = [], min(len(s_names), len(t_names))
    for i in indices:
        if not 1 <= abs(i) <= common:
            raise KdbenchError(f"sakd.stages: stage {i} is not a stage of both models (student has "
                               f"{len(s_names)}, teacher {len(t_names)})")
        pairs.append((s_names[i - 1], t_names[i - 1]) if i > 0 else (s_names[i], t_names[i]))
    if len(set(pairs)) != len(pairs):
        raise KdbenchError(f"sakd.stages names a stage twice: {spec!r}")
    return pairs


def make_head(kind: str, dim_in: int, num_classes: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim_in, num_classes)
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@register_method
class SAKD(Method):
    """Reconstruction of SAKD (Guo et al., Visual Intelligence 2023, from the abstract): parameter-free
    uniformization + semantic classification branch."""

    name = "sakd"
    family = "relation"
    # Marker for reports: designed from the abstract, not checked against the paper (no public code is known).
    note = deviation = "reconstruction from the abstract (DOI 10.1007/s44267-023-00003-0)"
    defaults = {
        **LOGIT_OPTIONS,
        "components": "both",
        "tokens": "spatial",
        "stages": "last",
        "pool_size": 8,
        "row_norm": "l2",
        "tau_a": 1.0,
        "vector": "full",
        "head": "linear",
        "head_hidden": 512,
        "head_input": "scaled",
        "head_mode": "prefit_teacher",
        "prefit_passes": 5,
        "prefit_lr": 0.001,
        "beta": 1.0,
        "gamma": 0.1,
        "delta": 0.0,
        "tau_b": 4.0,
    }
    presets = REPDISTILLER_PRESETS
    choices = {
        **Method.choices,
        "components": COMPONENTS,
        "tokens": ("spatial",),
        "row_norm": ROW_NORMS,
        "vector": VECTORS,
        "head": ("linear", "mlp"),
        "head_input": ("scaled", "raw"),
        "head_mode": ("prefit_teacher", "joint"),
    }
    ranges = {**Method.ranges, "pool_size": AT_LEAST_ONE, "tau_a": POSITIVE, "head_hidden": AT_LEAST_ONE,
              "prefit_passes": NON_NEGATIVE, "prefit_lr": POSITIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE,
              "delta": NON_NEGATIVE, "tau_b": POSITIVE}

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        if ctx.teacher_shapes is None:
            raise ValueError("sakd needs a teacher: MethodContext.teacher_shapes is None")
        opts: dict[str, Any] = {**self.defaults, **ctx.options}  # checked by resolve_options (choices, ranges)
        self.components = opts["components"]
        self.head_mode = opts["head_mode"]
        self.beta, self.gamma, self.tau_b = float(opts["beta"]), float(opts["gamma"]), float(opts["tau_b"])
        self.prefit_passes, self.prefit_lr = int(opts["prefit_passes"]), float(opts["prefit_lr"])
        delta = float(opts["delta"])
        if self.components == "branch" and delta != 0:
            raise KdbenchError("sakd.delta weights feature matching on the uniformized vectors; "
                               "components=branch has no uniformization, so leave sakd.delta at 0")
        # uniformization-only: feature matching is its only term, weight 1 unless set
        self.delta = (delta or 1.0) if self.components == "uniformization" else delta

        pairs = stage_pairs(opts["stages"], ctx.student_shapes, ctx.teacher_shapes)
        self.student_taps = tuple(s for s, _ in pairs)
        self.teacher_taps = tuple(t for _, t in pairs)
        pool = int(opts["pool_size"])
        self.sizes = [aligned_size(ctx.student_shapes[s], ctx.teacher_shapes[t], pool) for s, t in pairs]
        # The one parameter-free function applied to both networks.
        self.uniformize = (SpatialEnergy() if self.components == "branch"
                           else Uniformization(opts["row_norm"], float(opts["tau_a"]), opts["vector"]))
        self.vector_length = sum(self.uniformize.length(size) for size in self.sizes)
        self.head_scales = [self.uniformize.head_scale(size) if opts["head_input"] == "scaled" else 1.0
                            for size in self.sizes]
        self.head: nn.Module | None = None
        if self.components != "uniformization":
            self.head = make_head(opts["head"], self.vector_length, ctx.num_classes, int(opts["head_hidden"]))
            if self.head_mode == "prefit_teacher":
                if self.prefit_passes < 1:
                    raise KdbenchError("sakd.prefit_passes must be >= 1 with head_mode=prefit_teacher")
                self.head.requires_grad_(False)  # fitted in prepare, then frozen (also on resume)
        self.prefit_history: list[float] = []  # diagnostic: mean CE per prefit pass (plain attribute)

    # -------------------------------------------------------------------------------------------- vectors

    def _parts(self, features: dict[str, torch.Tensor], taps: tuple[str, ...], detach: bool) -> list[torch.Tensor]:
        return [self.uniformize(features[tap].detach() if detach else features[tap], size)
                for tap, size in zip(taps, self.sizes)]

    def student_vector(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """``u_S``: the student's stages through ``U`` (gradients flow), concatenated, fp32."""
        return torch.cat(self._parts(features, self.student_taps, detach=False), dim=1)

    def teacher_vector(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """``u_T``: the teacher's stages through the same ``U``, detached."""
        return torch.cat(self._parts(features, self.teacher_taps, detach=True), dim=1)

    def head_logits(self, u: torch.Tensor) -> torch.Tensor:
        """``g(u)`` in fp32 (autocast off), on the scaled vector (``head_input``)."""
        if self.head is None:
            raise ValueError("sakd with components=uniformization has no classification branch")
        lengths = [self.uniformize.length(size) for size in self.sizes]
        scaled = torch.cat([p * s for p, s in zip(u.split(lengths, dim=1), self.head_scales)], dim=1)
        with torch.autocast(device_type=u.device.type, enabled=False):
            return self.head(scaled.float())

    # -------------------------------------------------------------------------------------------- training

    def prepare(self, prep: Preparation) -> None:
        """``prefit_teacher``: fit ``g`` on the frozen teacher's vectors with CE, then freeze it."""
        if self.head is None or self.head_mode != "prefit_teacher":
            return
        self.head.train()
        self.head.requires_grad_(True)
        optimizer = torch.optim.Adam(self.head.parameters(), lr=self.prefit_lr)
        self.prefit_history = []
        try:
            with torch.enable_grad():
                for index in range(self.prefit_passes):
                    total, batches = torch.zeros((), device=prep.device), 0
                    for x, y in prep.train_batches(index):
                        _, teacher_features = prep.teacher(x)
                        loss = F.cross_entropy(self.head_logits(self.teacher_vector(teacher_features)), y)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += loss.detach()
                        batches += 1
                    self.prefit_history.append(total.item() / max(batches, 1))
        finally:
            self.head.requires_grad_(False)
            self.head.zero_grad(set_to_none=True)

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        if out.teacher_features is None or out.teacher_logits is None:
            raise ValueError("sakd needs the teacher's logits and features")
        terms = self.logit_terms(out)
        u_s = self.student_vector(out.student_features)
        u_t = self.teacher_vector(out.teacher_features)
        if self.head is not None:
            prefix = "sakd" if self.components == "both" else "branch"
            z_s, z_t = self.head_logits(u_s), self.head_logits(u_t)
            if self.head_mode == "joint":
                terms[f"{prefix}_head_ce"] = F.cross_entropy(z_t, out.labels)
            terms[f"{prefix}_kl"] = self.beta * kd_divergence(z_s, z_t.detach(), self.tau_b)
            terms[f"{prefix}_ce"] = self.gamma * F.cross_entropy(z_s, out.labels)
        if self.delta > 0:
            terms["sakd_mse"] = self.delta * F.mse_loss(u_s, u_t)
        return terms

    def extra_params_inference(self) -> int:
        return 0  # U is parameter-free and g is dropped: the deployed student is the plain model
