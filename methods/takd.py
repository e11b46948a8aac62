"""``takd``: Mirzadeh et al., AAAI 2020, "Improved Knowledge Distillation via Teacher Assistant" (arXiv 1902.03393).

A chain ``T -> A1 -> ... -> An -> S`` trained in sequence; each model learns by vanilla KD from the model just above
it only (imirzadeh/Teacher-Assistant-Knowledge-Distillation ``train.py``). kdbench trains every TA as a run of its
own, trained as teachers are (the teacher recipe and the teacher's seed, once per teacher: ``SweepSpec._taught``),
cached by lineage; A1 (taught by the teacher alone) is one ``kd`` run shared by TAKD and DGKD. The chain is the
pair's default (methods/assistants.py) or ``--ta-chain``; the paper's single-TA setting is ``--ta-chain
TEACHER:TA:STUDENT``.

Presets: crd ``0.1·CE + 0.9·KD_4`` and semckd ``CE + KD_4`` per chain step (batch-mean KL); official: the
TAKD/DGKD code's ``(1 − λ)·CE + λ·τ²·KL_mean`` with DGKD's defaults λ = 1, τ = 5 (imirzadeh/Teacher-Assistant-
Knowledge-Distillation ``train.py`` takes λ and τ from a per-run NNI search and has no default of its own;
wonchulSon/DGKD ``train.py``, built on it, fixes them), i.e. no CE and KL averaged over batch and classes.
"""

from __future__ import annotations

from kdbench.methods import register_method
from kdbench.methods.base import Method, StepOutputs
from kdbench.methods.kd import KD, KD_PRESETS

# λ = 1 (CE off), τ = 5, nn.KLDivLoss() mean reduction: wonchulSon/DGKD train.py defaults.
TA_CODE_PRESET = {"ce_weight": 0.0, "kd_weight": 1.0, "temperature": 5.0, "kl_reduction": "mean"}


@register_method
class TAKD(KD):
    name = "takd"
    family = "assistant"
    uses_assistants = True
    presets = {**KD_PRESETS, "official": TA_CODE_PRESET}
    # Its official code has no ImageNet settings: KD's ImageNet values (mdistiller's) do not carry over.
    pair_defaults = Method.pair_defaults

    def trainers_for_step(self, epoch: int, step: int) -> tuple[int, ...]:
        return (self.ctx.num_assistants,)  # the smallest trainer: the last assistant, or the teacher

    def losses(self, out: StepOutputs):
        return self.logit_terms(out, trainer=self.ctx.num_assistants)
