"""``kd_ls``, ``dkd_ls``, ``ctkd_ls``, ``mlkd_ls``: Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024 (arXiv 2403.01427), on the four hosts of its README.

LS is a pre-processing, not a loss: before a host's distillation term, each sample's logits, the student's and the
teacher's, are z-scored over the classes, ``ẑ = (z − mean(z)) / (std(z) + 1e-7)`` with the unbiased std, so the
student matches the teacher's logit *relations* rather than their range. The host's term then runs on ẑ unchanged
(a base temperature τ divides ẑ, T² scaling and all); CE stays on the raw logits. Official code
sunshangquan/logit-standardization-KD @ f6e5aa5: ``mdistiller/distillers/KD.py`` and ``DKD.py`` (``normalize``,
``kd_loss``, ``dkd_loss``), ``tools/train.py`` (``--logit-stand --base-temp 2 --kd-weight 9``), ``CTKD/`` (its copy of
zhengli97/CTKD: ``distiller_zoo/KD.py::DistillKL_logit_stand``, ``scripts/run_cifar_distill.sh``),
``mdistiller/distillers/MLKD.py``.

Settings, each the one behind the README's CIFAR-100 numbers (one objective under every protocol, as DKD's and DIST's:
the weights and τ are part of the method, since ẑ has unit spread and needs a small τ and a large weight):

- ``kd_ls``: ``0.1·CE + 9·τ²·KL(σ(ẑ_t/τ) ‖ σ(ẑ_s/τ))``, τ 2 (``mdistiller/engine/cfg.py`` ``CFG.KD`` at f6e5aa5, whose
  last change, 3ec213f, set CE 0.1 and τ 2; the earlier 2ba3954 and 6083e2d have CE 1; the CTKD script's ``-r 0.1``
  agrees with 0.1). Per pair, τ and the weight of the README's linked log (file names ``kd,T,S,τ,weight``): τ 3 for
  vgg13 → vgg8 and four more pairs, τ 3 and weight 1 for ResNet50 → MobileNetV2, τ 4 and weight 12 for resnet110 →
  resnet20.
- ``dkd_ls``: DKD (``methods/dkd.py``) on ẑ with ``α ← weight·α``, ``β ← weight·β``, ``T ← τ`` (``tools/train.py``
  multiplies both; an older revision, 2ece47f, multiplied β by the new α and left T at 4), CE 1, warm-up 20. Per pair,
  τ, weight and β from the log names (``dkd,T,S,τ,weight[,β]``; β from the pair's DKD config where the name has none):
  resnet56 → resnet20 runs τ 3, α 18, β 36.
- ``ctkd_ls``: CTKD (``methods/ctkd.py``) on ẑ, ``0.1·CE + 9·KD`` with the learnt temperature (``-r 0.1 -a 9 -b 0``;
  ``--kd_T 2`` is unused once the global temperature is on). In that copy, ``train_student.py`` picks the standardised
  loss when ``--logit_stand`` is *absent* (``DistillKL() if opt.logit_stand else DistillKL_logit_stand()``), and the
  script does not pass it: the published runs are standardised.

- ``mlkd_ls``: MLKD (``methods/mlkd.py``) with its instance-level terms on ẑ, ``0.1·CE`` and weight w 9 at base
  temperature 2, so the five temperatures are (2, 3, 5, 2, 6) (``mdistiller/distillers/MLKD.py``: ``kd_loss`` takes
  ``logit_stand``, ``cc_loss`` and ``bc_loss`` do not; ``tools/train.py`` sets ``KD_WEIGHT`` and ``TEMPERATURE`` from
  ``--kd-weight``/``--base-temp``; ``CFG.KD.LOSS.CE_WEIGHT`` 0.1). The class and batch correlations and the teacher's
  confidence masks stay on the raw logits, as there. Per pair, the weight of the README's linked logs
  (``mlkd,T,S,τ,weight``): 6 for vgg13 → vgg8, vgg13 → MobileNetV2 and resnet32x4 → ShuffleV2. The official runs
  use MLKD's 480-epoch schedule and lr (``configs/cifar100/mlkd/*.yaml``), a recipe, not the method.

Differences from the official code: none in the objective; DKD's binary distribution is a log-sum-exp
(``dkd_divergences``), the same in exact arithmetic as mdistiller's log of summed probabilities.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kdbench.methods import register_method
from kdbench.methods.base import StepOutputs
from kdbench.methods.ctkd import CTKD
from kdbench.methods.dkd import DKD, PAIR_BETA
from kdbench.methods.kd import KD
from kdbench.methods.mlkd import MLKD

STD_EPS = 1e-7  # added to the std, as ``normalize`` does
# (teacher, student) -> (base temperature τ, KD weight) of the README's kd+LS logs; other pairs take (2, 9).
KD_LS_PAIRS = {("vgg13", "vgg8"): (3.0, 9.0), ("resnet110", "resnet20"): (4.0, 12.0),
               ("resnet32x4", "wrn_16_2"): (3.0, 9.0), ("resnet32x4", "wrn_40_2"): (3.0, 9.0),
               ("wrn_40_2", "MobileNetV2"): (3.0, 9.0), ("vgg13", "MobileNetV2"): (3.0, 9.0),
               ("ResNet50", "MobileNetV2"): (3.0, 1.0)}
# (teacher, student) -> (τ, weight, config β) of the README's dkd+LS logs; other pairs take (2, 9, DKD's β).
DKD_LS_PAIRS = {("resnet56", "resnet20"): (3.0, 18.0, 2.0), ("resnet110", "resnet20"): (2.0, 15.0, 2.0),
                ("resnet110", "resnet32"): (2.0, 15.0, 2.0), ("ResNet50", "MobileNetV2"): (2.0, 15.0, 2.0),
                ("resnet32x4", "wrn_16_2"): (2.0, 9.0, 2.0), ("resnet32x4", "wrn_40_2"): (2.0, 9.0, 8.0),
                ("vgg13", "MobileNetV2"): (3.0, 9.0, 2.0), ("vgg13", "vgg8"): (2.0, 15.0, 2.0),
                ("wrn_40_2", "MobileNetV2"): (2.0, 15.0, 2.0), ("wrn_40_2", "resnet8x4"): (2.0, 18.0, 2.0),
                ("wrn_40_2", "wrn_16_2"): (2.0, 12.0, 2.0), ("wrn_40_2", "wrn_40_1"): (2.0, 12.0, 2.0)}
BASE_TEMPERATURE, LS_WEIGHT, DKD_BETA = 2.0, 9.0, 8.0  # tools/train.py's defaults; CFG.DKD.BETA
# (teacher, student) -> MLKD weight of the README's mlkd+LS logs; other pairs take 9.
MLKD_LS_WEIGHTS = {("vgg13", "vgg8"): 6.0, ("vgg13", "MobileNetV2"): 6.0, ("resnet32x4", "ShuffleV2"): 6.0}
KD_LS_OBJECTIVE = {"ce_weight": 0.1, "kd_weight": LS_WEIGHT, "temperature": BASE_TEMPERATURE}
CTKD_LS_OBJECTIVE = {"ce_weight": 0.1, "kd_weight": LS_WEIGHT}


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Each row z-scored over the classes in fp32: ``(z − mean) / (std + 1e-7)``, unbiased std (``normalize``)."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + STD_EPS)


class LogitStandardization:
    """Runs the host method's terms on standardised logits; its CE term is recomputed on the raw ones, which LS
    leaves alone. Put it before the host in the bases."""

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        standardized = replace(out, student_logits=standardize(out.student_logits),
                               teacher_logits=standardize(out.teacher_logits))
        terms = super().losses(standardized)
        if "ce" in terms:
            terms["ce"] = self.ctx.options["ce_weight"] * self.cross_entropy(out)
        return terms


@register_method
class KDLS(LogitStandardization, KD):
    """``0.1·CE + 9·KD_2`` on standardised logits, τ and weight per pair (Sun et al., CVPR 2024)."""

    name = "kd_ls"
    defaults = {**KD.defaults, **KD_LS_OBJECTIVE}
    presets = {"official": KD_LS_OBJECTIVE, "crd": KD_LS_OBJECTIVE, "semckd": KD_LS_OBJECTIVE}

    @classmethod
    def pair_defaults(cls, teacher, student):
        if (teacher, student) not in KD_LS_PAIRS:
            return {}
        temperature, weight = KD_LS_PAIRS[teacher, student]
        return {"temperature": temperature, "kd_weight": weight}


@register_method
class DKDLS(LogitStandardization, DKD):
    """DKD on standardised logits with α and β scaled by the LS weight and T at the base temperature."""

    name = "dkd_ls"
    defaults = {**DKD.defaults, "temperature": BASE_TEMPERATURE, "alpha": LS_WEIGHT, "beta": LS_WEIGHT * DKD_BETA}

    @classmethod
    def pair_defaults(cls, teacher, student):
        if (teacher, student) in DKD_LS_PAIRS:
            temperature, weight, beta = DKD_LS_PAIRS[teacher, student]
            return {"temperature": temperature, "alpha": weight, "beta": weight * beta}
        return {"beta": LS_WEIGHT * PAIR_BETA[teacher, student]} if (teacher, student) in PAIR_BETA else {}


@register_method
class CTKDLS(LogitStandardization, CTKD):
    """CTKD's learnt temperature on standardised logits, ``0.1·CE + 9·KD_τ``."""

    name = "ctkd_ls"
    defaults = {**CTKD.defaults, **CTKD_LS_OBJECTIVE}
    presets = {"official": CTKD_LS_OBJECTIVE, "crd": CTKD_LS_OBJECTIVE, "semckd": CTKD_LS_OBJECTIVE}


@register_method
class MLKDLS(MLKD):
    """MLKD with its instance-level KL terms on standardised logits, ``0.1·CE``, weight 9 at base τ 2."""

    name = "mlkd_ls"
    defaults = {**MLKD.defaults, **KD_LS_OBJECTIVE}
    presets = {"official": KD_LS_OBJECTIVE, "crd": KD_LS_OBJECTIVE, "semckd": KD_LS_OBJECTIVE}

    def instance_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return standardize(logits)

    @classmethod
    def pair_defaults(cls, teacher, student):
        weight = MLKD_LS_WEIGHTS.get((teacher, student))
        return {} if weight is None else {"kd_weight": weight}
