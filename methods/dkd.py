"""``dkd``: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv 2203.08679).

Classical KD splits into a target-class term and a non-target-class term, KD = TCKD + (1 − p_t)·NCKD (paper
Eq. 3/4), where the teacher's confidence p_t suppresses NCKD exactly on the samples the teacher knows well; DKD
weights the two independently: ``DKD = α·TCKD + β·NCKD``. Official code megvii-research/mdistiller
``mdistiller/distillers/DKD.py`` (``dkd_loss``): TCKD is the KL between the binary distributions
``[p_y, Σ_{j≠y} p_j]`` at temperature T, NCKD the KL between the softmaxes of ``z/T − 1000·onehot(y)``; both
summed over classes, averaged over the batch and scaled by T².

Objective: ``ce_weight·CE + min(e / warmup_epochs, 1)·DKD`` with mdistiller's 1-indexed e, i.e. kdbench's
0-indexed ``epoch + 1``; defaults α 1, β 8, T 4, warm-up 20, CE 1 (``mdistiller/engine/cfg.py`` ``CFG.DKD``),
β per pair from ``configs/cifar100/dkd/*.yaml``. DKD is itself the logit term, so every protocol (official, crd,
semckd) resolves to that same objective: the semckd protocol's added KD_4 would count the KD signal twice.
``kl_reduction`` applies only to a logit KD term a user adds with ``kd_weight``. The warm-up scales with the
recipe (20 at 240 epochs; ``Method.epoch_options``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.methods import register_method
from kdbench.methods.base import AT_LEAST_ONE, LOGIT_OPTIONS, NON_NEGATIVE, Method, StepOutputs

NON_TARGET_MASK = 1000.0  # subtracted from the target's z/T so that the NCKD softmaxes ignore it (mdistiller)
DKD_OBJECTIVE = {"ce_weight": 1.0, "kd_weight": 0.0}  # CE + warm-up·DKD, no separate logit KD
# β of the mdistiller configs (configs/cifar100/dkd/*.yaml; 8 where a config sets none); resnet110 -> resnet20 and
# ResNet50 -> vgg8 have no config: kdbench takes the β of their closest configured pairs (2 and 8).
# mdistiller's ImageNet configs (configs/imagenet/{r34_r18,r50_mv1}/dkd.yaml): T 1, warm-up 1, CE 1, and β per pair.
IMAGENET_DKD = {("tv_resnet34", "tv_resnet18"): {"beta": 0.5, "temperature": 1.0, "warmup_epochs": 1},
                ("tv_resnet50", "mobilenet_v1"): {"beta": 2.0, "temperature": 1.0, "warmup_epochs": 1}}
PAIR_BETA = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("resnet110", "resnet20"): 2.0,
             ("vgg13", "vgg8"): 6.0, ("vgg13", "MobileNetV2"): 6.0, ("wrn_40_2", "wrn_16_2"): 6.0,
             ("wrn_40_2", "wrn_40_1"): 6.0}


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """mdistiller's loss warm-up ``min(e / warmup, 1)`` with its 1-indexed e, from kdbench's 0-indexed ``epoch``:
    1/warmup of the weight in the first epoch, the full weight from epoch ``warmup_epochs`` on."""
    return min((epoch + 1) / warmup_epochs, 1.0)


def dkd_divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T²·`` batch-mean KL, in fp32.

    The binary log-probabilities are log-sum-exps of the log-softmax, equal to mdistiller's ``log`` of summed
    probabilities but finite where a student probability underflows (its ``log`` would give inf)."""
    z_s, z_t = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    target = F.one_hot(labels, z_s.shape[1]).bool()

    def binary(z: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(z, dim=1)
        return torch.stack([log_p.masked_fill(~target, -torch.inf).logsumexp(1),
                            log_p.masked_fill(target, -torch.inf).logsumexp(1)], dim=1)

    def non_target(z: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(z - NON_TARGET_MASK * target, dim=1)

    tckd = F.kl_div(binary(z_s), binary(z_t), reduction="batchmean", log_target=True)
    nckd = F.kl_div(non_target(z_s), non_target(z_t), reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2


@register_method
class DKD(Method):
    """``ce_weight·CE + warm-up·(α·TCKD + β·NCKD)`` (Zhao et al., CVPR 2022; megvii-research/mdistiller
    ``mdistiller/distillers/DKD.py``); the same objective under every protocol."""

    name = "dkd"
    family = "logit"
    logit_kd = True
    epoch_options = ("warmup_epochs",)
    defaults = {**LOGIT_OPTIONS, **DKD_OBJECTIVE, "alpha": 1.0, "beta": 8.0, "warmup_epochs": 20}
    ranges = {**Method.ranges, "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "warmup_epochs": AT_LEAST_ONE}
    presets = {"official": DKD_OBJECTIVE, "crd": DKD_OBJECTIVE, "semckd": DKD_OBJECTIVE}

    @classmethod
    def pair_defaults(cls, teacher, student):
        if (teacher, student) in IMAGENET_DKD:
            return dict(IMAGENET_DKD[teacher, student])
        beta = PAIR_BETA.get((teacher, student))
        return {} if beta is None else {"beta": beta}

    def losses(self, out: StepOutputs):
        options = self.ctx.options
        tckd, nckd = dkd_divergences(out.student_logits, out.teacher_logits, out.labels, options["temperature"])
        warmup = warmup_factor(out.epoch, options["warmup_epochs"])
        terms = self.logit_terms(out)
        for term, value, weight in (("tckd", tckd, options["alpha"]), ("nckd", nckd, options["beta"])):
            if weight:  # as logit_terms: a term whose weight is 0 is left out
                terms[term] = warmup * weight * value
        return terms
