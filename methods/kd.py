"""``kd``: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).

The student matches the teacher's temperature-softened class distribution: ``ce_weight·CE + kd_weight·T²·KL``,
batch-mean KL (HobbitLong/RepDistiller ``distiller_zoo/KD.py::DistillKL``). Presets: crd and official
``0.1·CE + 0.9·KD_4`` (HobbitLong/RepDistiller ``scripts/run_cifar_distill.sh``; the paper has no official code,
RepDistiller is the CIFAR benchmark's), semckd ``CE + KD_4`` (DefangChen/SemCKD ``scripts/run_cifar_distill.sh``).
On the field's two ImageNet pairs the official values are mdistiller's ImageNet configs'
(``configs/imagenet/{r34_r18,r50_mv1}/kd.yaml``): ``0.5·CE + 0.5·KD_1``, under every protocol, as per-pair values are.
"""

from __future__ import annotations

from kdbench.methods import register_method
from kdbench.methods.base import LOGIT_OPTIONS, Method, StepOutputs

# The vanilla-KD weights of the crd and semckd conventions; TAKD and DGKD use them for every trainer.
KD_PRESETS = {"crd": {"ce_weight": 0.1, "kd_weight": 0.9}, "semckd": {"ce_weight": 1.0, "kd_weight": 1.0}}
# The ImageNet pairs of CRD, mdistiller and DKD (ResNet-34 -> ResNet-18, ResNet-50 -> MobileNet-V1), and
# mdistiller's KD there.
IMAGENET_PAIRS = (("tv_resnet34", "tv_resnet18"), ("tv_resnet50", "mobilenet_v1"))
IMAGENET_KD = {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0}


@register_method
class KD(Method):
    name = "kd"
    family = "logit"
    logit_kd = True
    defaults = {**LOGIT_OPTIONS, **KD_PRESETS["crd"]}
    presets = {**KD_PRESETS, "official": KD_PRESETS["crd"]}

    @classmethod
    def pair_defaults(cls, teacher, student):
        return dict(IMAGENET_KD) if (teacher, student) in IMAGENET_PAIRS else {}

    def losses(self, out: StepOutputs):
        return self.logit_terms(out)
