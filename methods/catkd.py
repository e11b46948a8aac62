"""``catkd``: Guo, Yan, Zhang, Liu, "Class Attention Transfer Based Knowledge Distillation", CVPR 2023
(arXiv 2304.12777).

The student learns where the teacher looks for each class: class activation maps (CAMs), the classifier applied as
a 1×1 convolution to the map its pooling reads, average-pooled to a small grid and compared by mean squared error.
Official code GzyAftermath/CAT-KD (built on mdistiller): ``mdistiller/distillers/CAT_KD.py`` (``CAT_loss``,
``_Normalize``), ``tools/train.py`` (``if_test``: each model's classifier becomes ``conv_test``, a bias-free 1×1
convolution before the pooling, the teacher's holding its ``fc`` weight) and ``configs/cifar100/CAT_KD/*.yaml``.

- CAMs: ``A[n, c] = Σ_k W[c, k]·F[n, k]`` over the ``pre_pool`` map F (what the official ``feats[-1]`` is), W the
  model's classifier weight without its bias; the student's W is its own, trained by both terms, the teacher's a
  frozen copy made by ``prepare`` (kept in the method's state, so a resumed run has it).
- Loss: ``ce_weight·CE + beta·MSE(P(A_s), P(A_t))``, P the adaptive average pooling to ``cam_resolution``²,
  each map L2-normalised over its positions first when ``normalize`` is on (``F.normalize(dim=(2, 3))``).
- Defaults (mdistiller's ``CFG.CAT_KD``): β 400, resolution 2, normalised, CE 1; per pair the configs' values, e.g.
  resnet56 → resnet20: β 0.7, not normalised; vgg13 → vgg8: β 4.5, not normalised. CAT-KD has no logit KD term, so
  every protocol resolves to this objective, as DKD's does.

Labelled deviation (``deviation``, flagged ``[o]``): the official student is the bias-free ``conv_test`` variant of
its architecture, so its logits have no classifier bias; kdbench's student keeps its zoo classifier, bias included
(100 parameters on CIFAR-100), and its CAMs leave the bias out, as the official ones do.

On several processes (kdbench.distributed) rank 0 copies the teacher's classifier and the others load it from there;
the CAM loss is a mean over each process's own images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.methods import register_method
from kdbench.methods.base import AT_LEAST_ONE, LOGIT_OPTIONS, NON_NEGATIVE, Method, Preparation, StepOutputs
from kdbench.methods.heads import classifier_of

CATKD_OBJECTIVE = {"ce_weight": 1.0, "kd_weight": 0.0}
# configs/cifar100/CAT_KD/*.yaml: (β, CAM resolution, normalise) per (teacher, student)
PAIR_SETTINGS = {("resnet56", "resnet20"): (0.7, 2, False), ("resnet110", "resnet32"): (1.8, 2, False),
                 ("resnet32x4", "resnet8x4"): (15.0, 2, False), ("vgg13", "vgg8"): (4.5, 2, False),
                 ("wrn_40_2", "wrn_16_2"): (12.0, 2, False), ("wrn_40_2", "wrn_40_1"): (1.5, 2, False),
                 ("resnet32x4", "ShuffleV1"): (600.0, 4, True), ("resnet32x4", "ShuffleV2"): (600.0, 4, True),
                 ("wrn_40_2", "ShuffleV1"): (80.0, 4, True), ("vgg13", "MobileNetV2"): (15.0, 2, True),
                 ("ResNet50", "MobileNetV2"): (40.0, 2, True)}
CAM_TAP = "pre_pool"  # the map the classifier's pooling reads


def class_activation_maps(feature: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv_test(feature)``: the classifier weight (classes × channels) as a bias-free 1×1 convolution."""
    return F.conv2d(feature, weight[:, :, None, None])


def cat_loss(student_cams: torch.Tensor, teacher_cams: torch.Tensor, resolution: int, normalize: bool) -> torch.Tensor:
    """``CAT_loss``: the MSE between the CAMs pooled to ``resolution``², each L2-normalised over its positions first
    when ``normalize``."""
    pooled = [F.adaptive_avg_pool2d(cams, (resolution, resolution)) for cams in (student_cams, teacher_cams)]
    if normalize:
        pooled = [F.normalize(cams, dim=(2, 3)) for cams in pooled]
    return F.mse_loss(*pooled)


@register_method
class CATKD(Method):
    """``ce_weight·CE + beta·CAT`` on class activation maps (Guo et al., CVPR 2023; GzyAftermath/CAT-KD); the same
    objective under every protocol."""

    name = "catkd"
    family = "feature"
    student_taps = (CAM_TAP,)
    teacher_taps = (CAM_TAP,)
    defaults = {**LOGIT_OPTIONS, **CATKD_OBJECTIVE, "beta": 400.0, "cam_resolution": 2, "normalize": True}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "cam_resolution": AT_LEAST_ONE}
    presets = {"official": CATKD_OBJECTIVE, "crd": CATKD_OBJECTIVE, "semckd": CATKD_OBJECTIVE}
    deviation = ("the student keeps its classifier bias; the official student is its bias-free conv_test variant "
                 "(its CAMs, like kdbench's, have no bias)")

    @classmethod
    def pair_defaults(cls, teacher, student):
        settings = PAIR_SETTINGS.get((teacher, student))
        if settings is None:
            return {}
        beta, resolution, normalize = settings
        return {"beta": beta, "cam_resolution": resolution, "normalize": normalize}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.register_buffer("teacher_weight", torch.zeros(ctx.num_classes, ctx.teacher_shapes[CAM_TAP][0]))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._student_head: nn.Linear | None = None

    def prepare(self, prep: Preparation) -> None:
        self.teacher_weight.copy_(classifier_of(prep.teacher_model, *self.teacher_weight.shape[::-1]).weight)
        self.fitted.fill_(True)

    def attach(self, student: nn.Module) -> None:
        # a reference, not a submodule: the student's classifier trains (and counts) as the student's
        object.__setattr__(self, "_student_head", classifier_of(student, self.ctx.student_shapes[CAM_TAP][0],
                                                               self.ctx.num_classes))

    def losses(self, out: StepOutputs):
        if not bool(self.fitted):
            raise RuntimeError("catkd: prepare() has not copied the teacher's classifier")
        options = self.ctx.options
        with torch.autocast(device_type=out.student_logits.device.type, enabled=False):
            student_cams = class_activation_maps(out.student_features[CAM_TAP].float(),
                                                 self._student_head.weight.float())
            teacher_cams = class_activation_maps(out.teacher_features[CAM_TAP].detach().float(), self.teacher_weight)
            loss = cat_loss(student_cams, teacher_cams, options["cam_resolution"], options["normalize"])
        return {**self.logit_terms(out), "cat": options["beta"] * loss}
