"""``ft``: factor transfer.

Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018
(arXiv 1802.04977). As in HobbitLong/RepDistiller (``distiller_zoo/FT.py::FactorTransfer``,
``models/util.py::Paraphraser, Translator``, ``helper/pretrain.py::init``, ``train_student.py`` branch ``factor``):

- Paraphraser: an autoencoder on the teacher's last stage map (``stageK``), conv3×3 C_t→C_t→C_t/2→C_t/2 and back
  with transposed convs, each followed by LeakyReLU(0.1), no BN. Translator: conv3×3 C_s→C_s→C_t/2→C_t/2 on the
  student's ``stageK``, each with BN and LeakyReLU(0.1).
- Init stage (``init_epochs``, 30 under every recipe): SGD over the paraphraser alone minimises
  ``MSE(decoder(encoder(F_t)), F_t)``; the student is not trained. That makes the stage a fit of the teacher's
  paraphraser, not a share of the student's schedule, so unlike AB's and FSP's it does not scale with the recipe:
  one epoch of a 1,000-image subset would be 15 steps, an autoencoder barely started. Its lr is constant: 0.01
  for a CIFAR ResNet or WRN student, else the student's base lr (RepDistiller decides by the student's
  architecture, though only the teacher's paraphraser is trained).
- Main stage: the paraphraser is frozen; ``φ_s`` = translator(F_s), ``φ_t`` = encoder(F_t) (under no_grad),
  the spatially larger pooled to the smaller, ``a(φ) = normalize_2(mean_c φ²)``,
  ``L_FT = mean_{b,hw} |a(φ_s) − a(φ_t)|`` (the code's channel-collapsed factor; the paper normalises the whole
  flattened factor). Presets: official and crd ``CE + 200·L_FT`` (RepDistiller ``scripts/run_cifar_distill.sh``
  ``-a 0 -b 200``), semckd ``CE + KD_4 + 200·L_FT`` (kdbench's choice: the crd weight).

During the init stage the student runs in eval mode, as RepDistiller's ``init`` leaves it: neither its parameters
nor its BN running statistics change before the main stage (``InitStage.student_train_modules`` is empty).

On several processes (kdbench.distributed) the paraphraser's init stage trains each process's shard with the gradients
averaged, as the main stage; its loss is per sample. RepDistiller trains FT on one GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.methods import register_method
from kdbench.methods.at import attention_map, pool_to_smaller
from kdbench.methods.base import (
    LOGIT_OPTIONS,
    NON_NEGATIVE,
    REPDISTILLER_PRESETS,
    InitStage,
    Method,
    MethodContext,
    StepOutputs,
)
from kdbench.models import model_entry
from kdbench.models.taps import stage_names

FACTOR_RATE = 0.5  # factor channels per teacher channel (RepDistiller's k)
# RepDistiller's paraphraser lr for CIFAR ResNet and WRN students (helper/pretrain.py::init)
CIFAR_RESNET_INIT_LR = 0.01
CIFAR_RESNET_FAMILIES = ("resnet", "wrn")


def conv_stack(widths: list[int], conv: type[nn.Module], batch_norm: bool) -> nn.Sequential:
    """3×3 stride-1 convs ``widths[0] → widths[1] → …``, each followed by [BN and] LeakyReLU(0.1)."""
    layers = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if batch_norm else []),
                   nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """RepDistiller's ``Paraphraser(t_shape, k=0.5, use_bn=False)``: encoder to the factor, decoder back."""

    def __init__(self, channels: int):
        super().__init__()
        factor = int(channels * FACTOR_RATE)
        self.encoder = conv_stack([channels, channels, factor, factor], nn.Conv2d, batch_norm=False)
        self.decoder = conv_stack([factor, factor, channels, channels], nn.ConvTranspose2d, batch_norm=False)


def factor_loss(factor_s: torch.Tensor, factor_t: torch.Tensor) -> torch.Tensor:
    """``mean_{b,hw} |a(φ_s) − a(φ_t)|`` with ``a`` the p = 2 attention map, the larger map pooled first
    (RepDistiller ``FactorTransfer.factor_loss``, p1 = 2, p2 = 1)."""
    factor_s, factor_t = pool_to_smaller(factor_s, factor_t)
    return (attention_map(factor_s, 2) - attention_map(factor_t, 2)).abs().mean()


@register_method
class FT(Method):
    """Factor transfer through a paraphraser trained in an init stage (Kim et al., NeurIPS 2018; RepDistiller
    ``distiller_zoo/FT.py``)."""

    name = "ft"
    family = "feature"
    defaults = {**LOGIT_OPTIONS, "beta": 200.0, "init_epochs": 30}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "init_epochs": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.student_taps = (stage_names(ctx.student_shapes)[-1],)
        self.teacher_taps = (stage_names(ctx.teacher_shapes)[-1],)
        c_s, c_t = ctx.student_shapes[self.student_taps[0]][0], ctx.teacher_shapes[self.teacher_taps[0]][0]
        self.paraphraser = Paraphraser(c_t)
        factor = int(c_t * FACTOR_RATE)
        self.translator = conv_stack([c_s, c_s, factor, factor], nn.Conv2d, batch_norm=True)

    def init_stage(self, student: nn.Module, base_lr: float) -> InitStage:
        lr = CIFAR_RESNET_INIT_LR if model_entry(self.ctx.student).family in CIFAR_RESNET_FAMILIES else base_lr
        return InitStage(self.ctx.options["init_epochs"], tuple(self.paraphraser.parameters()), lr,
                         frozen_after=(self.paraphraser,))

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        f_t = out.teacher_features[self.teacher_taps[0]].detach()
        if out.stage == "init":
            reconstruction = self.paraphraser.decoder(self.paraphraser.encoder(f_t))
            return {"paraphraser": F.mse_loss(reconstruction.float(), f_t.float())}
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(f_t)
        factor_s = self.translator(out.student_features[self.student_taps[0]])
        return {**self.logit_terms(out), "ft": self.ctx.options["beta"] * factor_loss(factor_s.float(),
                                                                                    factor_t.float())}

    def extra_params_train(self) -> int:
        """The translator, trained with the student; the paraphraser, trained alone on the teacher's maps and then
        frozen, is reported apart (``fit_metrics``)."""
        return sum(p.numel() for p in self.translator.parameters())

    def fit_metrics(self) -> dict[str, float]:
        return {"frozen_aux_params": float(sum(p.numel() for p in self.paraphraser.parameters()))}
