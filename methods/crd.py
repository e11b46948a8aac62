"""``crd``: contrastive representation distillation.

Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020 (arXiv 1910.10699); official code
HobbitLong/RepDistiller (``crd/criterion.py::CRDLoss, ContrastLoss, Embed``, ``crd/memory.py::ContrastMemory``,
``dataset/cifar100.py::CIFAR100InstanceSample``, mode ``exact``), as megvii-research/mdistiller
``mdistiller/distillers/CRD.py``. The ``pooled`` features of both models are embedded (``Linear`` to ``feat_dim`` =
128, then ``x/‖x‖₂``; both embeddings trained) and contrasted against two momentum memory banks of every training
image, symmetrically: the teacher embedding against the student bank and the student embedding against the teacher
bank. Per anchor, the positive is its own bank row and the ``nce_k`` = 16,384 negatives are drawn uniformly from
the images of the other classes: without replacement, or with replacement when the anchor's class has fewer other-class
images than K (RepDistiller's ``CIFAR100InstanceSample``: ``replace = self.k > len(self.cls_negative[target])``;
on a training subset of a few thousand images, every draw). With ``e = exp(⟨bank row, v⟩/τ)`` (τ = 0.07) and
``P = e/Z``, where Z is set once, on the first batch, to ``mean(e)·N`` and then frozen, each side's NCE loss with noise
``P_n = 1/N`` and ``m = K`` is ``−(1/B)[Σ_b log(P_b0/(P_b0 + mP_n + ε)) + Σ_{b,k≥1} log(mP_n/(P_bk + mP_n + ε))]``,
ε = 1e-7; ``L_CRD`` is their sum. After scoring, each anchor's bank rows move to ``normalise(μ·row + (1−μ)·v)``
(``nce_m`` μ = 0.5). Loss ``ce_weight·CE + kd_weight·KD_T + β·L_CRD``, β = 0.8. Presets: official and crd
``CE + 0.8·L_CRD`` (RepDistiller ``scripts/run_cifar_distill.sh``, ``-a 0 -b 0.8``); semckd ``CE + KD_4 + 0.8·L_CRD``
(DefangChen/SemCKD ``scripts/run_cifar_distill.sh``; RepDistiller's "CRD+KD").

Negatives are drawn on the device, from a generator seeded by (seed, epoch, step), the step counted in a buffer:
without replacement as the K smallest of uniform float64 keys, same-class keys set above every other (exactly
uniform), with replacement by ``torch.multinomial`` over the other-class positions.
The class of every position is a buffer of fixed size N, unlike per-class tables whose width depends on the class
sizes, so a resumed run loads it (with the banks, Z and the step count) without running ``prepare``.
Scores are one ``(B, D)×(D, N)`` product per side and a gather, instead of RepDistiller's gather of B·(K+1) bank
rows: the same numbers without its B×(K+1)×D tensors (0.54 GB per side at N = 50,000, K = 16,384, B = 64).

On several processes (kdbench.distributed) the banks stay one: every process gathers the global batch's positions
and detached embeddings (each process's shard padded to its full share, the padding dropped), draws the negatives of
the whole batch as one process would and keeps its own shard's rows, and applies the whole batch's update to its
banks, so the banks, Z (set from the global first batch's scores) and the negatives equal
one process's on the same global batch; each process's NCE loss is over its own anchors, and the gradients are
averaged. ``prepare`` copies the training labels only, which every process has. RepDistiller trains CRD on one GPU;
mdistiller's DataParallel keeps only the first GPU's bank updates, an artefact not copied.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdbench.distributed import gathered, summed
from kdbench.errors import KdbenchError
from kdbench.loader import stream_seed
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
    Range,
    StepOutputs,
)

EPS = 1e-7  # RepDistiller crd/criterion.py
TAP = "pooled"


class Embed(nn.Module):
    """``Linear(d → feat_dim)`` then ``x/‖x‖₂``, without an eps as in RepDistiller ``Embed``/``Normalize``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return x / x.norm(dim=1, keepdim=True)


def nce_loss(p: torch.Tensor, noise: float) -> torch.Tensor:
    """RepDistiller ``ContrastLoss``: ``p`` is (B, K+1), the positive in column 0; ``noise`` is P_n = 1/N."""
    mp = (p.shape[1] - 1) * noise
    positive = torch.log(p[:, 0] / (p[:, 0] + mp + EPS))
    negative = torch.log(mp / (p[:, 1:] + mp + EPS))
    return -(positive.sum() + negative.sum()) / p.shape[0]


@register_method
class CRD(Method):
    """Symmetric NCE against two momentum memory banks (Tian et al., ICLR 2020; RepDistiller ``crd/``)."""

    name = "crd"
    family = "relation"
    student_taps = teacher_taps = (TAP,)
    defaults = {**LOGIT_OPTIONS, "beta": 0.8, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "feat_dim": 128}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "nce_k": AT_LEAST_ONE, "nce_t": POSITIVE, "nce_m": Range(0, 1),
              "feat_dim": AT_LEAST_ONE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        if ctx.teacher_shapes is None or TAP not in ctx.teacher_shapes or TAP not in ctx.student_shapes:
            raise KdbenchError("crd needs the pooled feature of the student and of the teacher")
        options = ctx.options
        dim = int(options["feat_dim"])
        self.embed_s = Embed(math.prod(ctx.student_shapes[TAP]), dim)
        self.embed_t = Embed(math.prod(ctx.teacher_shapes[TAP]), dim)
        # Everything below is a buffer, so a resumed run (which loads the state and skips prepare) restores it.
        n = max(ctx.num_train, 1)  # 0: not known (plan-time builds)
        bound = 1 / math.sqrt(dim / 3)
        self.register_buffer("memory_v1", torch.rand(n, dim).mul_(2 * bound).sub_(bound))  # student bank
        self.register_buffer("memory_v2", torch.rand(n, dim).mul_(2 * bound).sub_(bound))  # teacher bank
        # RepDistiller's [K, τ, Z_v1, Z_v2, m]; K = 0 until prepare sets it, Z < 0 until the first batch.
        self.register_buffer("params", torch.tensor([0.0, options["nce_t"], -1.0, -1.0, options["nce_m"]]))
        self.register_buffer("train_labels", torch.full((n,), -1, dtype=torch.long))  # class of every position
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # steps taken, for the negatives' seed
        # Host copies of K, the step count and whether negatives are drawn with replacement, so that a step needs
        # no device sync; reloaded with the state.
        self.num_negatives = self.steps_taken = 0
        self.replacement: bool | None = None
        self.register_load_state_dict_post_hook(CRD._host_copies)

    @staticmethod
    def _host_copies(module: "CRD", _incompatible) -> None:
        module.num_negatives, module.steps_taken = int(module.params[0].item()), int(module.steps.item())
        module.replacement = module._replacement()

    def _replacement(self) -> bool | None:
        """True when every class has fewer other-class positions than K (all draws with replacement), False when
        none has (all without), None when it depends on the anchor's class, or before prepare."""
        if not self.num_negatives:
            return None
        counts = torch.bincount(self.train_labels)
        short = self.train_labels.numel() - counts[counts > 0] < self.num_negatives
        return True if bool(short.all()) else False if not bool(short.any()) else None

    def prepare(self, prep: Preparation) -> None:
        labels = prep.train_labels
        if labels is None or labels.shape != self.train_labels.shape:
            raise ValueError(f"crd needs the class of each of its {self.train_labels.numel()} training positions "
                             f"(Preparation.train_labels); got {None if labels is None else tuple(labels.shape)}")
        if labels.numel() == int(torch.bincount(labels).max()):
            raise KdbenchError("crd needs training images of at least two classes (its negatives are other-class)")
        self.train_labels.copy_(labels)
        self.num_negatives = int(self.ctx.options["nce_k"])
        self.params[0] = self.num_negatives
        self.replacement = self._replacement()

    def negatives(self, anchors: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """(B, K) training positions, for each anchor position drawn uniformly from the positions of other classes,
        with replacement where there are fewer than K of them; a pure function of (seed, epoch, step) and the
        anchors."""
        labels, k = self.train_labels, self.num_negatives
        generator = torch.Generator(device=labels.device)
        generator.manual_seed(stream_seed(self.ctx.seed, epoch, f"crd-negatives:{step}"))
        other = labels[anchors].unsqueeze(1) != labels.unsqueeze(0)  # (B, N)

        def with_replacement(rows: torch.Tensor) -> torch.Tensor:
            return torch.multinomial(rows.double(), k, replacement=True, generator=generator)

        def without_replacement(rows: torch.Tensor) -> torch.Tensor:
            keys = torch.rand(rows.shape, generator=generator, device=labels.device, dtype=torch.float64)
            keys.masked_fill_(~rows, 2.0)  # keys are < 1
            return keys.topk(k, dim=1, largest=False, sorted=False).indices

        if self.replacement is not None:  # every anchor alike (the usual case): no device sync
            return with_replacement(other) if self.replacement else without_replacement(other)
        replace = other.sum(dim=1) < k  # classes on both sides of K: decided per anchor
        drawn = torch.empty(anchors.shape[0], k, dtype=torch.long, device=labels.device)
        if replace.any():
            drawn[replace] = with_replacement(other[replace])
        if not replace.all():
            drawn[~replace] = without_replacement(other[~replace])
        return drawn

    def contrast_loss(self, v_s: torch.Tensor, v_t: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        """``L(P_s) + L(P_t)`` for embeddings (B, D) and bank positions ``contrast`` (B, K+1), positive first; sets
        Z on the first call (RepDistiller ``ContrastMemory.forward``: out_v1 is P_s, out_v2 is P_t)."""
        # Copies: backward needs the banks as they were scored, and update_memory changes them in place.
        bank_s, bank_t, params = self.memory_v1.clone(), self.memory_v2.clone(), self.params.clone()
        n, tau = bank_s.shape[0], params[1]
        e_s = torch.exp(torch.gather(v_s @ bank_t.t(), 1, contrast) / tau)  # student anchor, teacher bank
        e_t = torch.exp(torch.gather(v_t @ bank_s.t(), 1, contrast) / tau)  # teacher anchor, student bank
        with torch.no_grad():
            means = torch.stack([e_s.mean(), e_t.mean()])
            if self.world.size > 1 and self.steps_taken == 1:  # a run's first step sets Z: the global batch's mean
                totals = summed(torch.stack([e_s.sum(), e_t.sum(), e_s.new_tensor(e_s.numel())]),
                                self.world)
                means = totals[:2] / totals[2]
            z = torch.where(params[2:4] < 0, means * n, params[2:4])
            self.params[2:4] = z
        return nce_loss(e_s / z[0], 1 / n) + nce_loss(e_t / z[1], 1 / n)

    @torch.no_grad()
    def update_memory(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """``bank[index] ← normalise(μ·bank[index] + (1−μ)·v)``, without an eps (RepDistiller ``ContrastMemory``)."""
        momentum = self.params[4]
        for memory, v in ((self.memory_v1, v_s), (self.memory_v2, v_t)):
            rows = memory.index_select(0, index) * momentum + v * (1 - momentum)
            memory.index_copy_(0, index, rows / rows.norm(dim=1, keepdim=True))

    def whole_batch(self, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each of ``rows`` (per-sample tensors of this process's shard, the positions first) over the global
        batch, in the order of one process's batch: process r holds its rows r, r + N, ... (kdbench.loader's deal).
        A shard of a smaller last batch is padded to the full share (position -1) for the gather."""
        world = self.world
        if world.size == 1:
            return rows
        share, n = self.ctx.batch_size, rows[0].shape[0]
        padded = [t.new_full((share, *t.shape[1:]), -1).index_copy_(0, torch.arange(n, device=t.device), t)
                  for t in rows]
        every = [gathered(t, world).transpose(0, 1) for t in padded]  # (share, N, ...): global row j·N + r
        kept = every[0] >= 0
        return tuple(t[kept] for t in every)

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        if out.teacher_features is None or out.indices is None:
            raise ValueError("crd needs the teacher's features and each sample's training position (indices)")
        if not self.num_negatives:
            raise RuntimeError("crd: prepare() has not set the training labels its negatives are drawn from")
        step, index = self.steps_taken, out.indices
        self.steps_taken += 1
        self.steps.add_(1)
        with torch.autocast(device_type=index.device.type, enabled=False):
            v_s = self.embed_s(out.student_features[TAP].float())
            v_t = self.embed_t(out.teacher_features[TAP].detach().float())
            batch, batch_s, batch_t = self.whole_batch(index, v_s.detach(), v_t.detach())
            negatives = self.negatives(batch, out.epoch, step)[self.world.rank::self.world.size]  # this shard's
            loss = self.contrast_loss(v_s, v_t, torch.cat([index.unsqueeze(1), negatives], dim=1))
            self.update_memory(batch, batch_s, batch_t)
        return {**self.logit_terms(out), "crd": self.ctx.options["beta"] * loss}
