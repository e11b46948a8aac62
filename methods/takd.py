"""``takd``: Mirzadeh et al., AAAI 2020, "Improved Knowledge Distillation via Teacher Assistant" (arXiv 1902.03393).

A chain ``T -> A1 -> ... -> An -> S`` trained in sequence; each model learns by vanilla KD (the run
protocol's weights, batch-mean KL, T = 4; methods.md §4) from the model just above it only. kdbench
trains every TA as a run of its own, cached by lineage; A1 (taught by the teacher alone) is the same run
for TAKD and DGKD. The chain is the pair's default (methods/assistants.py) or ``--ta-chain``; the TAKD
paper's single-TA setting is ``--ta-chain TEACHER:TA:STUDENT``.
"""

from __future__ import annotations

from kdbench.methods import register_method
from kdbench.methods.base import StepOutputs
from kdbench.methods.kd import KD


@register_method
class TAKD(KD):
    name = "takd"
    uses_assistants = True

    def trainers_for_step(self, epoch: int, step: int) -> tuple[int, ...]:
        return (self.ctx.num_assistants,)  # the smallest trainer: the last assistant, or the teacher

    def losses(self, out: StepOutputs):
        return self.kd_terms(out, out.trainer_logits(self.ctx.num_assistants))
