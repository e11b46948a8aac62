"""``dgkd``: Son et al., ICCV 2021, "Densely Guided Knowledge Distillation using Multiple Teacher Assistants"
(arXiv 2009.08825; official code wonchulSon/DGKD).

Like TAKD's chain, but each model is taught by every larger, already trained model, and the final student
uses stochastic teaching: trainers are dropped at random per mini-batch (wonchulSon/DGKD ``train.py``). Loss:
``s_ce·ce_weight·CE + kd_weight·Σ_{kept P} KD_T(z_S, z_P) / d``. Presets: crd and semckd use their vanilla-KD
weights at T = 4 with batch-mean KL; official is the DGKD code: ``0·CE + 1·τ²·Σ KL_mean`` at τ = 5 (takd.py).

Where the paper and the official code disagree (each is an option; default first):
- ``drop_mode``: ``exact_k`` drops exactly ``drop_k`` of the n+1 trainers per batch, teacher included
  (official code); ``bernoulli`` keeps each with ``p_survive`` = 0.75, resampling when all are dropped
  (paper); ``none`` disables stochastic teaching.
- ``ce_scale``: ``code`` keeps the CE weight of vanilla KD (official code's ``1 - λ``); ``paper`` multiplies
  it by n+1 (the paper's sum of n+1 KD losses, each with its own CE).
- ``trainer_reduction``: ``sum`` over kept trainers (paper and code) or ``mean``.
- ``skip_dropped_forward``: dropped trainers are not forwarded (the code forwards all; same loss, less work).
- ``stochastic_tas``: the paper drops trainers only for the final student (default false).
- The code's own λ = 1, τ = 5 and ``KLDivLoss`` mean reduction are the official preset (``kl_reduction=mean``);
  crd and semckd use batch-mean KL, where those values would mean other weights (``KLDivLoss()``'s mean is the
  batch-mean KL divided by the number of classes).
Gates are drawn on the host from a generator seeded by (seed, epoch, step): replayable, no device sync.
"""

from __future__ import annotations

import torch

from kdbench.loader import stream_seed
from kdbench.methods import register_method
from kdbench.methods.base import NON_NEGATIVE, Range, StepOutputs, kd_divergence
from kdbench.methods.kd import KD
from kdbench.methods.takd import TAKD


@register_method
class DGKD(KD):
    name = "dgkd"
    family = "assistant"
    uses_assistants = True
    defaults = {**KD.defaults, "drop_mode": "exact_k", "drop_k": 1, "p_survive": 0.75, "teacher_droppable": True,
                "ce_scale": "code", "trainer_reduction": "sum", "skip_dropped_forward": True, "stochastic_tas": False}
    choices = {**KD.choices, "drop_mode": ("exact_k", "bernoulli", "none"), "ce_scale": ("code", "paper"),
               "trainer_reduction": ("sum", "mean")}
    # p_survive = 0 would resample the gates forever
    ranges = {**KD.ranges, "drop_k": NON_NEGATIVE, "p_survive": Range(0, 1, low_open=True)}
    presets = TAKD.presets
    pair_defaults = TAKD.pair_defaults

    def __init__(self, ctx):
        super().__init__(ctx)
        self.kept: tuple[int, ...] = ()

    @property
    def num_trainers(self) -> int:
        return self.ctx.num_assistants + 1

    def gates(self, epoch: int, step: int) -> tuple[int, ...]:
        """Indices of the trainers kept for this step (0 = teacher), a pure function of (seed, epoch, step)."""
        options, n = self.ctx.options, self.num_trainers
        stochastic = self.ctx.role == "student" or options["stochastic_tas"]
        droppable = list(range(n)) if options["teacher_droppable"] else list(range(1, n))
        if not stochastic or options["drop_mode"] == "none" or not droppable or n == 1:
            return tuple(range(n))
        generator = torch.Generator().manual_seed(stream_seed(self.ctx.seed, epoch, f"dgkd-gates:{step}"))
        if options["drop_mode"] == "exact_k":
            k = min(options["drop_k"], n - 1, len(droppable))
            order = torch.randperm(len(droppable), generator=generator)[:k].tolist()
            dropped = {droppable[i] for i in order}
        else:
            while True:  # resample until at least one trainer survives
                drop = (torch.rand(len(droppable), generator=generator) >= options["p_survive"]).tolist()
                dropped = {i for i, d in zip(droppable, drop) if d}
                if len(dropped) < n:
                    break
        return tuple(i for i in range(n) if i not in dropped)

    def trainers_for_step(self, epoch: int, step: int) -> tuple[int, ...]:
        self.kept = self.gates(epoch, step)
        return self.kept if self.ctx.options["skip_dropped_forward"] else tuple(range(self.num_trainers))

    def losses(self, out: StepOutputs):
        options = self.ctx.options
        kd = sum(kd_divergence(out.student_logits, out.trainer_logits(i), options["temperature"],
                               options["kl_reduction"]) for i in self.kept)
        if options["trainer_reduction"] == "mean":
            kd = kd / len(self.kept)
        s_ce = self.num_trainers if options["ce_scale"] == "paper" else 1
        terms = {"ce": s_ce * options["ce_weight"] * self.cross_entropy(out)} if options["ce_weight"] else {}
        return {**terms, "kd": options["kd_weight"] * kd}
