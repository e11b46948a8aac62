"""``reviewkd``: Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021 (arXiv 2104.09044).

Each teacher stage is supervised by a fusion of the student's same and deeper stages: a residual "review" path
runs deep -> shallow through attention-based fusion (ABF) modules, and a hierarchical context loss (HCL, MSE at the
full size and at 4×4, 2×2, 1×1 average pools) compares every level with the teacher's. Official code
dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py`` (``ABF``, ``build_review_kd``, ``hcl``) and its
megvii-research/mdistiller port ``mdistiller/distillers/ReviewKD.py``.

Levels: the student's post-ReLU ``stage1..K`` and ``pooled`` (as C×1×1) against the teacher's
``stage1_preact..stageK_preact`` and ``pooled``. ``build_review_kd``'s per-model channel and size lists are read
off the models' tap shapes, which reproduces every pair it lists. Objective ``ce_weight·CE + kd_weight·KD_T +
min(e / warmup_epochs, 1)·β·L_HCL`` with mdistiller's 1-indexed e (kdbench's ``epoch + 1``). β: 1 (mdistiller's
``REVIEWKD_WEIGHT``), or the ``--kd-loss-weight`` of ``CIFAR-100/script/reviewKD.sh`` for the pairs it runs.
Presets: official and crd ``CE + β·L`` (the script runs without ``--use-kl``); semckd adds KD_4. The warm-up
scales with the recipe (20 at 240 epochs; ``Method.epoch_options``).

On ImageNet, mdistiller's configs (``configs/imagenet/{r34_r18,r50_mv1}/reviewkd.yaml``) set β 1 and 8 and
``STU_PREACT``: an ImageNet student's levels (a model whose input is 224) are its stages' pre-activations. Its
``MAX_MID_CHANNEL`` is read but unused there; the width stays min(512, ·).

kdbench runs ReviewKD as mdistiller does, on the CRD recipe with the teacher in eval mode. The authors'
``CIFAR-100/train.py`` differs: batch 128, lr 0.1 (0.02 for ShuffleNet/MobileNet students), Nesterov, a warm-up
``min(1, e/20)`` with 0-indexed e (no feature loss in the first epoch), and a teacher never put in eval mode (its
batch statistics normalise, and its running statistics move).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.base import AT_LEAST_ONE, LOGIT_OPTIONS, NON_NEGATIVE, REPDISTILLER_PRESETS, Method, StepOutputs
from kdbench.methods.dkd import warmup_factor
from kdbench.models import model_entry
from kdbench.models.taps import stage_names

MAX_MID_CHANNELS = 512  # the ABFs' width: min(512, the student's pooled channels) (official `mid_channel`)
IMAGENET_INPUT = 224
HCL_POOLS = (4, 2, 1)  # HCL's pooled sizes, weighted 1/2, 1/4, 1/8 in the order kept (those below the map's size)
# --kd-loss-weight of dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh, by (teacher, student)
PAIR_WEIGHT = {("wrn_40_2", "wrn_16_2"): 5.0, ("wrn_40_2", "wrn_40_1"): 5.0, ("wrn_40_2", "ShuffleV1"): 5.0,
               ("resnet32x4", "resnet8x4"): 5.0, ("resnet32x4", "ShuffleV1"): 5.0, ("resnet32x4", "ShuffleV2"): 8.0,
               ("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1.0}
# REVIEWKD_WEIGHT of mdistiller's ImageNet configs
IMAGENET_WEIGHT = {("tv_resnet34", "tv_resnet18"): 1.0, ("tv_resnet50", "mobilenet_v1"): 8.0}


class ABF(nn.Module):
    """Attention-based fusion of one level: ``1×1 conv + BN`` to the common width, a per-pixel two-way sigmoid
    attention over this level and the residual from the deeper one (absent at the deepest level), a nearest resize
    to the teacher's size, ``3×3 conv + BN`` to the teacher's channels. Returns (output, residual for the next)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, :1] + residual * attention[:, 1:]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def hcl_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_levels [MSE + Σ_j w_j·MSE(pool_j)] / (1 + Σ_j w_j)`` in fp32 (official ``hcl``)."""
    total = 0.0
    for f_s, f_t in zip(student_maps, teacher_maps):
        f_s, f_t = f_s.float(), f_t.float()
        loss, weight, weight_sum = F.mse_loss(f_s, f_t), 1.0, 1.0
        for size in (s for s in HCL_POOLS if s < f_s.shape[-2]):
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
            weight_sum += weight
        total = total + loss / weight_sum
    return total


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A tap as a (B, C, H, W) map: ``pooled`` (B, D) becomes (B, D, 1, 1)."""
    return feature if feature.dim() == 4 else feature.reshape(*feature.shape, 1, 1)


@register_method
class ReviewKD(Method):
    """Cross-stage review with ABF fusion and HCL (Chen et al., CVPR 2021; dvlab-research/ReviewKD
    ``CIFAR-100/model/reviewkd.py``)."""

    name = "reviewkd"
    family = "feature"
    epoch_options = ("warmup_epochs",)
    defaults = {**LOGIT_OPTIONS, "beta": 1.0, "warmup_epochs": 20}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "warmup_epochs": AT_LEAST_ONE}
    presets = REPDISTILLER_PRESETS
    min_batch = 2  # the pooled level's ABF normalises a 1x1 map over the batch

    @classmethod
    def pair_defaults(cls, teacher, student):
        weight = PAIR_WEIGHT.get((teacher, student), IMAGENET_WEIGHT.get((teacher, student)))
        return {} if weight is None else {"beta": weight}

    def __init__(self, ctx):
        super().__init__(ctx)
        s_stages, t_stages = stage_names(ctx.student_shapes), stage_names(ctx.teacher_shapes)
        t_preact = [f"{name}_preact" for name in t_stages]
        if ctx.student and model_entry(ctx.student).input_size >= IMAGENET_INPUT:  # mdistiller's STU_PREACT
            s_stages = [f"{name}_preact" for name in s_stages]
        if (not s_stages or len(s_stages) != len(t_stages) or not set(t_preact) <= set(ctx.teacher_shapes)
                or not set(s_stages) <= set(ctx.student_shapes)):
            raise KdbenchError(f"reviewkd pairs student and teacher stages one to one and needs the teacher's "
                               f"pre-activation taps (and an ImageNet student's); the student has "
                               f"{len(s_stages)} stages, the teacher {len(t_stages)}")
        # levels shallow -> deep, the pooled vector last (official `in_channels`, `out_channels`)
        self.student_taps, self.teacher_taps = (*s_stages, "pooled"), (*t_preact, "pooled")
        s_shapes = [ctx.student_shapes[name] for name in self.student_taps]
        t_shapes = [ctx.teacher_shapes[name] for name in self.teacher_taps]
        mid = min(MAX_MID_CHANNELS, s_shapes[-1][0])
        # deepest level first, as the review path runs and as the official `abfs[::-1]` stores them
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=level > 0)
                                  for level, (s, t) in enumerate(zip(s_shapes[::-1], t_shapes[::-1])))
        self.out_sizes = [tuple(shape[1:]) or (1, 1) for shape in t_shapes[::-1]]

    def review(self, student_features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The fused student maps, shallow -> deep, each of its teacher level's shape."""
        outputs, residual = [], None
        for abf, name, size in zip(self.abfs, self.student_taps[::-1], self.out_sizes):
            output, residual = abf(as_map(student_features[name]), residual, size)
            outputs.append(output)
        return outputs[::-1]

    def losses(self, out: StepOutputs):
        options = self.ctx.options
        teacher = [as_map(out.teacher_features[name].detach()) for name in self.teacher_taps]
        weight = warmup_factor(out.epoch, options["warmup_epochs"]) * options["beta"]
        return {**self.logit_terms(out), "review": weight * hcl_loss(self.review(out.student_features), teacher)}
