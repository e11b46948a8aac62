"""``fitnet``: Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets" (arXiv 1412.6550), single-stage.

As in the CIFAR-100 benchmarks (HobbitLong/RepDistiller ``distiller_zoo/FitNet.py::HintLoss``,
``models/util.py::ConvReg``): a regressor maps the student's hint-layer map (feat[hint_layer]) to the teacher's,
trained jointly with the student from epoch 1; loss ``MSE`` weighted ``beta`` = 100. Presets: official and crd
``CE + 100·hint`` at hint layer 2 (RepDistiller ``scripts/run_cifar_distill.sh``, ``-a 0 -b 100 --hint_layer 2``
by default); semckd ``CE + KD_4 + 100·hint`` at hint layer 1, the DefangChen/SemCKD ``train_student.py`` default
that its scripts keep.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.base import FEATURE_PRESETS, LOGIT_OPTIONS, NON_NEGATIVE, Method, StepOutputs


class ConvReg(nn.Module):
    """Student map (C_s, H_s, W_s) -> teacher map (C_t, H_t, W_t), chosen from the spatial sizes.

    RepDistiller's three branches (stride-2 conv, stride-2 transposed conv, "valid" conv), plus
    DefangChen/SemCKD's fourth for a student map smaller than the teacher's by other than 2x: a 3x3 conv
    at the student's size, with the teacher target average-pooled to it (``pool_target``).
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shape, teacher_shape
        self.pool_target = None
        if h_s == 2 * h_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            self.conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif h_s >= h_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
        else:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=1, padding=1)
            self.pool_target = (h_s, w_s)
        self.bn = nn.BatchNorm2d(c_t)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))

    def target(self, teacher_map):
        return teacher_map if self.pool_target is None else F.adaptive_avg_pool2d(teacher_map, self.pool_target)


def hint_tap(layer: int) -> str:
    """RepDistiller's feat[layer] as a tap name: feat[0] is the stem, feat[k] the k-th stage output."""
    return "stem" if layer == 0 else f"stage{layer}"


@register_method
class FitNet(Method):
    name = "fitnet"
    family = "feature"
    defaults = {**LOGIT_OPTIONS, "hint_layer": 2, "beta": 100.0}
    # hint_layer's top depends on the models: __init__ checks it, and the plan builds every method before a run
    ranges = {**Method.ranges, "hint_layer": NON_NEGATIVE, "beta": NON_NEGATIVE}
    presets = {"official": {**FEATURE_PRESETS["crd"], "hint_layer": 2},
               "crd": {**FEATURE_PRESETS["crd"], "hint_layer": 2},
               "semckd": {**FEATURE_PRESETS["semckd"], "hint_layer": 1}}

    def __init__(self, ctx):
        super().__init__(ctx)
        tap = hint_tap(ctx.options["hint_layer"])
        if tap not in ctx.student_shapes or tap not in ctx.teacher_shapes:
            raise KdbenchError(f"fitnet.hint_layer={ctx.options['hint_layer']} is not a feature of both models; "
                               "valid: 0 (stem) up to the smaller number of stages")
        self.student_taps = self.teacher_taps = (tap,)
        self.regressor = ConvReg(ctx.student_shapes[tap], ctx.teacher_shapes[tap])

    def losses(self, out: StepOutputs):
        tap = self.student_taps[0]
        hint = F.mse_loss(self.regressor(out.student_features[tap]).float(),
                          self.regressor.target(out.teacher_features[tap]).float())
        return {**self.logit_terms(out), "hint": self.ctx.options["beta"] * hint}
