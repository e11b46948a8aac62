"""``mlkd``: Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023.

The student matches the teacher at three levels of the softened predictions, each at five temperatures: instance
(KL of each sample's class distribution), class (the C×C Gram matrix of the batch's predictions, "class
correlation") and batch (the B×B Gram matrix, "batch correlation"); on a weak and a strong augmentation of each
batch, the teacher's confidence on the weak view masking the terms. Official code Jin-Ying/Multi-Level-Logit-
Distillation @ 5ee473f: ``mdistiller/distillers/KD_ours.py`` (``kd_loss``, ``cc_loss``, ``bc_loss``,
``KD_ours.forward_train``), ``mdistiller/dataset/cifar100.py`` (``get_cifar100_train_transform_strong``: the weak
view is crop + flip, the strong one crop + flip + RandAugment(2) + Cutout, kdbench's ``strong`` view:
``kdbench/augment.py``), ``mdistiller/engine/trainer.py`` (``AugTrainer``: one optimiser step on the sum),
``configs/cifar100/ours/*.yaml`` (240 epochs, batch 64, lr 0.025) and ``mdistiller/engine/cfg.py`` (``CFG.KD``:
T 4, CE 0.1, KD 0.9).

As the code computes it (T_0 the ``temperature`` option, TS = (T_0, 3, 5, 2, 6), w the ``kd_weight``, KD_T the
batch-mean ``T²·KL``, CC_T = Σ(G_t − G_s)²/C over the C×C Gram matrices of the softmaxes at T, BC_T the same over
the B×B ones divided by B):

- ``ce``: ``ce_weight · (CE(weak) + CE(strong))``;
- ``kd``: ``w·f·Σ_TS KD_T(weak) + w·(KD_{T_0} + KD_3 + KD_5)(strong) + w·(KD_2 + KD_6)(weak)``;
- ``cc``: ``w·g·Σ_TS CC_T(weak)``; ``bc``: ``w·f·Σ_TS BC_T(weak)``;

where f is the fraction of the batch whose teacher confidence (max softmax at T = 1 on the weak view) is at most
its median (``np.percentile(·, 50)``, linear interpolation) and g the fraction of classes whose summed confidence is
at most theirs. **The code's masks are not per-sample:** it multiplies a batch-mean scalar by the boolean mask and
averages, which scales the term by the masked fraction; kdbench computes that, not the paper's per-sample masking.
The strong ``kd`` group repeats the weak view at T 2 and 6 (the code's indexing), and the strong view's class and
batch terms are computed but not returned, so they are absent here. Each is labelled in the code as it is; kdbench
follows the code.

One objective under every protocol (its own logit terms; the semckd protocol's added KD_4 would count the signal
twice). The official runs train at lr 0.025, half the paper recipe's: give ``--lr 0.025`` to run as they do (the
recipe is the run's, not the method's).

On several processes (kdbench.distributed) the confidence masks and the batch- and class-level terms are each process's
shard's, as MLKD's code (mdistiller's DataParallel) computes them per GPU chunk. Those two terms grow with the batch
they see (the class term is not divided by it), so a run of N processes weights them as its official code does on N
GPUs, not as on one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.methods import register_method
from kdbench.methods.base import LOGIT_OPTIONS, Method, StepOutputs

MLKD_OBJECTIVE = {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0}  # mdistiller's CFG.KD
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # the code's, after the configured one


def softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits.float() / temperature, dim=1)


def instance_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(p_t ‖ p_s)``, summed over classes, averaged over the batch (``kd_loss``)."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=1)
    return F.kl_div(log_p_s, softened(teacher, temperature), reduction="none").sum(1).mean() * temperature**2


def class_correlation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``Σ(P_tᵀP_t − P_sᵀP_s)² / C`` (``cc_loss``): how classes co-occur in the batch's predictions."""
    p_s, p_t = softened(student, temperature), softened(teacher, temperature)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / student.shape[1]


def batch_correlation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``Σ(P_tP_tᵀ − P_sP_sᵀ)² / B`` (``bc_loss``): how alike the batch's samples are predicted."""
    p_s, p_t = softened(student, temperature), softened(teacher, temperature)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / student.shape[0]


def at_most_median(values: torch.Tensor) -> torch.Tensor:
    """Fraction of ``values`` at most their median, the median interpolated as ``np.percentile(·, 50)``."""
    return (values <= torch.quantile(values.float(), 0.5, interpolation="linear")).float().mean()


@register_method
class MLKD(Method):
    """Instance, class and batch correlation at five temperatures on weak and strong views (Jin et al., CVPR 2023;
    Jin-Ying/Multi-Level-Logit-Distillation); the same objective under every protocol."""

    name = "mlkd"
    family = "logit"
    logit_kd = True
    views = ("strong",)
    defaults = {**LOGIT_OPTIONS, **MLKD_OBJECTIVE}
    presets = {"official": MLKD_OBJECTIVE, "crd": MLKD_OBJECTIVE, "semckd": MLKD_OBJECTIVE}

    def instance_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the instance-level terms see: the logits themselves here; logit standardisation z-scores them
        (``mlkd_ls``, ``methods/ls.py``), leaving the class and batch terms and the confidence masks on the raw ones."""
        return logits

    def losses(self, out: StepOutputs):
        options = self.ctx.options
        weak_s, weak_t = out.student_logits, out.teacher_logits.detach()
        strong_s, strong_t = out.views["strong"]
        strong_t = strong_t.detach()
        (instance_weak_s, instance_weak_t, instance_strong_s,
         instance_strong_t) = map(self.instance_logits, (weak_s, weak_t, strong_s, strong_t))
        temperatures = (options["temperature"], *EXTRA_TEMPERATURES)
        confident = softened(weak_t, 1.0)
        samples, classes = at_most_median(confident.max(dim=1).values), at_most_median(confident.sum(dim=0))
        w = options["kd_weight"]

        def summed(term, student, teacher, over=temperatures):
            return sum(term(student, teacher, t) for t in over)

        kd = (w * samples * summed(instance_kd, instance_weak_s, instance_weak_t)
              + w * summed(instance_kd, instance_strong_s, instance_strong_t, temperatures[:3])
              + w * summed(instance_kd, instance_weak_s, instance_weak_t, temperatures[3:]))
        terms = {"ce": options["ce_weight"] * (F.cross_entropy(weak_s.float(), out.labels)
                                               + F.cross_entropy(strong_s.float(), out.labels)),
                 "kd": kd,
                 "cc": w * classes * summed(class_correlation, weak_s, weak_t),
                 "bc": w * samples * summed(batch_correlation, weak_s, weak_t)}
        return {name: value for name, value in terms.items() if name != "ce" or options["ce_weight"]}
