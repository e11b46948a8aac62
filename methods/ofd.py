"""``ofd``: a comprehensive overhaul of feature distillation.

Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019 (arXiv 1904.01866);
official code clovaai/overhaul-distillation ``CIFAR-100/distiller.py`` (``distillation_loss``,
``build_feature_connector``, ``get_margin_from_BN``) and ``CIFAR-100/train_with_distillation.py``, as
megvii-research/mdistiller ``mdistiller/distillers/OFD.py`` runs it on the CRD benchmark.

The student learns the teacher's pre-ReLU maps (``stageK_preact``) of the last min(S, T) stages of both models
(deep-aligned, mdistiller ``OFD._align_list``). Per stage a connector ``Conv2d(C_s→C_t, 1×1, no bias)``, init
N(0, √(2/C_t)), then ``BN(C_t)`` maps the student map ``s``; the teacher map is average-pooled to the student's size
(``t``). With the teacher's per-channel margin ``m`` and ``t' = max(t, m)``, the partial L2
``d = (s − t')²·1(s > t' ∨ t' > 0)`` skips the positions where the teacher is "off" and the student is at least as
negative as the teacher's expected negative response; ``ℓ_i = (1/B) Σ_{b,c,h,w} d`` and
``L_OFD = Σ_i ℓ_i / 2^{n−1−i}`` (deepest stage weight 1).

Margins: from the affine parameters (γ_c, β_c) of the teacher's BatchNorm before each stage's ReLU (the model's
``preact_bn``), ``m_c = E[x | x < 0]`` for x ~ N(β_c, γ_c²), i.e. ``β − |γ|·φ(β/|γ|)/Φ(−β/|γ|)``, or ``−3|γ|`` where
Φ(−β/|γ|) ≤ 0.001. ``prepare`` computes them from the frozen teacher into buffers, so a resumed run (which loads the
state and skips ``prepare``) has them. ShuffleNets have no such BatchNorm (the official ``get_bn_before_relu`` raises
NotImplementedError for them): OFD refuses a ShuffleNet teacher when the sweep is planned.

Labelled deviation (``note`` and ``deviation``, which the report flags): both official codes run the teacher with
batch statistics (clovaai ``d_net.t_net.train()``; mdistiller's ``OFD.train`` puts every child, the teacher too, in
train mode), which also moves the teacher's running statistics; the author calls this deliberate
(clovaai/overhaul-distillation issue #37).
kdbench keeps the teacher frozen in eval mode by default, so its maps use the running statistics.
``teacher_batch_stats=true`` normalises the teacher's maps in training steps with each batch's statistics, as the
official codes do, without their drift: the teacher's running statistics stay as trained (kdbench.harness
``batch_statistics``), so evaluation, the margins and every other run of the teacher are unchanged.

Presets: official and crd ``CE + 0.001·L_OFD`` (mdistiller ``OFD.LOSS.FEAT_WEIGHT 0.001``; clovaai
``loss_distill.sum() / batch_size / 1000``); semckd ``CE + KD_4 + 0.001·L_OFD``.

On several processes (kdbench.distributed) the margins are read once, on rank 0, and the others load them; the
partial L2 is a per-image mean over each process's own images, and ``teacher_batch_stats`` uses each process's
shard's statistics, as the official codes' DataParallel replicas do.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.base import LOGIT_OPTIONS, NON_NEGATIVE, REPDISTILLER_PRESETS, Method, Preparation, StepOutputs
from kdbench.models import create_model
from kdbench.models.taps import stage_names

TAIL_MIN = 0.001  # below this probability of a negative response the margin is −3|γ| (get_margin_from_BN)


def bn_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per channel ``E[x | x < 0]`` for x ~ N(bias, weight²), or ``−3|weight|`` where P(x < 0) ≤ TAIL_MIN; fp32."""
    s, m = weight.detach().cpu().double().abs(), bias.detach().cpu().double()
    tail = torch.special.ndtr(-m / s)  # P(x < 0)
    expected = m - s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / tail
    return torch.where(tail > TAIL_MIN, expected, -3 * s).float()


def partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``(1/B) Σ (s − t')²·1(s > t' ∨ t' > 0)`` with ``t' = max(t, margin)`` (clovaai ``distillation_loss``, /B)."""
    target = torch.maximum(t, margin.reshape(1, -1, 1, 1))
    keep = (s > target) | (target > 0)
    return torch.where(keep, (s - target).pow(2), 0.0).sum() / s.shape[0]


def connector(c_s: int, c_t: int) -> nn.Sequential:
    """1×1 conv (N(0, √(2/C_t)), no bias) then BN(C_t) (γ 1, β 0): clovaai ``build_feature_connector``."""
    conv = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_t))
    return nn.Sequential(conv, nn.BatchNorm2d(c_t))


def unsupported_teacher(teacher: str) -> KdbenchError:
    return KdbenchError(f"ofd cannot learn from the teacher {teacher}: its margins need the BatchNorm before each "
                        f"stage's ReLU, which {teacher} does not declare (ShuffleNets; the official code refuses them)")


@functools.cache
def declares_preact_bn(arch: str) -> bool:
    with torch.device("meta"):  # no weights are allocated or drawn
        return bool(getattr(create_model(arch), "preact_bn", None))


@register_method
class OFD(Method):
    """Partial L2 between connected student and teacher pre-ReLU maps (Heo et al., ICCV 2019;
    clovaai/overhaul-distillation ``CIFAR-100/distiller.py``). Not batch-dependent."""

    name = "ofd"
    family = "feature"
    note = deviation = "eval-mode teacher (the official code normalises the teacher with batch statistics)"
    defaults = {**LOGIT_OPTIONS, "beta": 0.001, "teacher_batch_stats": False}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE}
    presets = REPDISTILLER_PRESETS

    @classmethod
    def pair_defaults(cls, teacher, student):
        """mdistiller's ImageNet weight on ResNet-50 -> MobileNet-V1 (``configs/imagenet/r50_mv1/ofd.yaml``: 1e-4);
        refuses a teacher without ``preact_bn`` here, where its name is known."""
        if teacher is not None and not declares_preact_bn(teacher):
            raise unsupported_teacher(teacher)
        return {"beta": 1e-4} if (teacher, student) == ("tv_resnet50", "mobilenet_v1") else {}

    @classmethod
    def deviation_of(cls, options):
        """None with ``teacher_batch_stats``: the teacher's maps are then normalised as the official codes do."""
        return "" if options.get("teacher_batch_stats") == "True" else cls.deviation

    def __init__(self, ctx):
        super().__init__(ctx)
        self.teacher_batch_stats = bool(ctx.options["teacher_batch_stats"])
        if self.teacher_batch_stats:
            self.note = "teacher normalised with batch statistics, its running statistics frozen (official: drifting)"
        s_stages, t_stages = stage_names(ctx.student_shapes), stage_names(ctx.teacher_shapes)
        depth = min(len(s_stages), len(t_stages))
        self.student_taps = tuple(f"{name}_preact" for name in s_stages[len(s_stages) - depth:])
        self.teacher_taps = tuple(f"{name}_preact" for name in t_stages[len(t_stages) - depth:])
        missing = [t for t in self.student_taps if t not in ctx.student_shapes] + [
            t for t in self.teacher_taps if t not in ctx.teacher_shapes]
        if not depth or missing:
            raise KdbenchError(f"ofd needs stage pre-activation taps of both models; missing: {missing or 'stages'}")
        channels = [(ctx.student_shapes[s][0], ctx.teacher_shapes[t][0])
                    for s, t in zip(self.student_taps, self.teacher_taps)]
        self.connectors = nn.ModuleList(connector(c_s, c_t) for c_s, c_t in channels)
        # buffers, so that a resumed run (which loads the state and skips prepare) restores them
        for i, (_, c_t) in enumerate(channels):
            self.register_buffer(f"margin{i}", torch.zeros(c_t))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._checked = False  # fitted read once (a device sync), on the first step

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def prepare(self, prep: Preparation) -> None:
        teacher = prep.teacher_model
        if teacher is None:
            raise ValueError("ofd reads its margins from the teacher model (Preparation.teacher_model)")
        paths = getattr(teacher, "preact_bn", {})
        if not set(self.teacher_taps) <= set(paths):
            raise unsupported_teacher(type(teacher).__name__)
        for margin, tap in zip(self.margins(), self.teacher_taps):
            bn = teacher.get_submodule(paths[tap])
            margin.copy_(bn_margin(bn.weight, bn.bias))
        self.fitted.fill_(True)

    def losses(self, out: StepOutputs):
        if not self._checked:
            if not bool(self.fitted):
                raise RuntimeError("ofd: prepare() has not computed the teacher's margins")
            self._checked = True
        mapped = [c(out.student_features[tap]) for c, tap in zip(self.connectors, self.student_taps)]
        depth = len(mapped)
        total = 0.0
        with torch.autocast(device_type=out.student_logits.device.type, enabled=False):
            for i, (s, tap, margin) in enumerate(zip(mapped, self.teacher_taps, self.margins())):
                s = s.float()
                t = F.adaptive_avg_pool2d(out.teacher_features[tap].detach().float(), s.shape[-2:])
                total = total + partial_l2(s, t, margin) / 2 ** (depth - 1 - i)
        return {**self.logit_terms(out), "ofd": self.ctx.options["beta"] * total}
