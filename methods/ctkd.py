"""``ctkd``: Li, Li, Yang, Zhang, Gong, Li, Wang, "Curriculum Temperature for Knowledge Distillation", AAAI 2023
(arXiv 2211.16231), the global-temperature version, on vanilla KD.

The KD temperature is learnt, adversarially: a gradient-reversal layer turns the temperature's gradient into an
ascent on the KD loss, scaled by λ, and λ grows from 0 to 1 along a cosine curriculum, so the task gets harder as the
student improves. Official code zhengli97/CTKD: ``models/temp_global.py`` (``Global_T``, ``GradientReversalFunction``),
``helper/loops.py::train_distill`` (``temp = t_start + t_end·sigmoid(Global_T)``), ``train_student.py``
(``CosineDecay``) and ``scripts/run_cifar_distill.sh`` (``--distill kd -r 0.1 -a 0.9 -b 0 --have_mlp 1 --mlp_name
global --cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10``; ``t_start`` 1, ``t_end`` 20 by default).

- Temperature: ``τ = t_start + t_range·sigmoid(θ)``, one parameter θ initialised at 1 (τ ≈ 15.6 at the start),
  trained by the run's SGD with the student (momentum and weight decay included, as the official optimiser does).
- Gradient reversal: θ's gradient is multiplied by ``λ(e) = lambda_min + (lambda_max − lambda_min)·(1 +
  cos(π·min(e, lambda_epochs)/lambda_epochs))/2`` with the official 1-indexed epoch e (kdbench's ``epoch + 1``): from
  about 0 in the first epoch to −1 from epoch ``lambda_epochs`` on (10 at 240 epochs, scaled with the recipe).
- Loss: ``ce_weight·CE + kd_weight·τ²·KL(σ(z_t/τ) ‖ σ(z_s/τ))``, batch-mean; the gradient reaches τ through both
  softmaxes. Presets: official and crd 0.1 CE + 0.9 KD (the script's ``-r 0.1 -a 0.9``), semckd CE + KD. The
  ``temperature`` option is not used: τ is learnt (the official ``kd_T`` is unused once the module is on).

On several processes (kdbench.distributed) the temperature's gradient is averaged with the others, so the group learns
one temperature, as CTKD's one-GPU CIFAR code does; its official ImageNet code (DDP) leaves the temperature out of DDP,
and each process learns its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.methods import register_method
from kdbench.methods.base import AT_LEAST_ONE, LOGIT_OPTIONS, NON_NEGATIVE, Method, StepOutputs
from kdbench.methods.kd import KD_PRESETS


class GradientReversal(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.scale * grad, None


def curriculum_lambda(epoch: int, epochs: int, high: float = 0.0, low: float = -1.0) -> float:
    """λ of 0-indexed ``epoch``: the official ``CosineDecay(max=high, min=low, num_loops=epochs).get_value`` at its
    1-indexed epoch."""
    step = min(max(epoch + 1, 0), epochs)
    return (math.cos(step * math.pi / epochs) + 1.0) / 2 * (high - low) + low


@register_method
class CTKD(Method):
    """``ce_weight·CE + kd_weight·KD_τ`` with τ learnt through gradient reversal (Li et al., AAAI 2023;
    zhengli97/CTKD)."""

    name = "ctkd"
    family = "logit"
    logit_kd = True
    epoch_options = ("lambda_epochs",)
    defaults = {**LOGIT_OPTIONS, **KD_PRESETS["crd"], "t_start": 1.0, "t_range": 20.0, "lambda_max": 0.0,
                "lambda_min": -1.0, "lambda_epochs": 10}
    ranges = {**Method.ranges, "t_start": NON_NEGATIVE, "t_range": NON_NEGATIVE, "lambda_epochs": AT_LEAST_ONE}
    presets = {**KD_PRESETS, "official": KD_PRESETS["crd"]}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.global_t = nn.Parameter(torch.ones(1))

    def temperature(self, epoch: int) -> torch.Tensor:
        """τ of this step, a one-element tensor whose gradient reaches ``global_t`` reversed by λ(epoch)."""
        options = self.ctx.options
        scale = curriculum_lambda(epoch, options["lambda_epochs"], options["lambda_max"], options["lambda_min"])
        reversed_t = GradientReversal.apply(self.global_t, scale)
        return options["t_start"] + options["t_range"] * torch.sigmoid(reversed_t)

    def losses(self, out: StepOutputs):
        options, terms = self.ctx.options, {}
        if options["ce_weight"]:
            terms["ce"] = options["ce_weight"] * self.cross_entropy(out)
        if options["kd_weight"]:
            tau = self.temperature(out.epoch).float().squeeze(0)  # a 0-dim tensor: the terms stay scalars
            terms["kd"] = options["kd_weight"] * softmax_target_kd(out.student_logits, out.teacher_logits, tau,
                                                                   options["kl_reduction"])
        return terms


def softmax_target_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: torch.Tensor,
                      reduction: str) -> torch.Tensor:
    """``τ²·KL(σ(z_t/τ) ‖ σ(z_s/τ))`` in fp32 with the teacher's probabilities as the target, as CTKD's
    ``DistillKL`` computes it. ``kd_divergence`` compares log-probabilities instead, which is the same in exact
    arithmetic, but near τ = 15 the distributions are close to uniform and the KL is a small difference of large logs:
    the two fp32 forms then differ by about 1 % in the gradient that reaches τ, so CTKD keeps its own."""
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=1)
    p_t = F.softmax(teacher_logits.float() / tau, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="batchmean") * tau**2
    return kl / student_logits.shape[1] if reduction == "mean" else kl
