"""Methods registered only by the tests: a minimal teacher-using method and one whose loss is NaN."""

import torch
import torch.nn.functional as F

from kdbench.methods import list_methods, register_method
from kdbench.methods.base import Method, StepOutputs

list_methods()  # load the real methods first, so `student` stays the first registered one


@register_method
class ProbeKD(Method):
    """Logit KD plus a feature read, recording what the harness hands over."""

    name = "probe-kd"
    student_taps = ("stage2",)
    teacher_taps = ("stage2",)
    seen: list[dict] = []

    def losses(self, out: StepOutputs):
        ProbeKD.seen.append({
            "teacher_requires_grad": out.teacher_logits.requires_grad
            or out.teacher_features["stage2"].requires_grad,
            "student_feature_shape": tuple(out.student_features["stage2"].shape),
            "student_requires_grad": out.student_logits.requires_grad,
        })
        t = 4.0
        kd = F.kl_div(F.log_softmax(out.student_logits.float() / t, 1), F.softmax(out.teacher_logits.float() / t, 1),
                      reduction="batchmean") * t * t
        return {"ce": self.cross_entropy(out), "kd": kd}


@register_method
class ProbeNaN(Method):
    name = "probe-nan"
    needs_teacher = False

    def losses(self, out: StepOutputs):
        return {"ce": self.cross_entropy(out) * torch.tensor(float("nan"))}


@register_method
class ProbeInit(Method):
    """An init stage (two epochs at lr 0.02) that fits a regressor from the student's stage2 to the teacher's, then
    freezes it; the main stage is CE plus the frozen regressor's hint loss."""

    name = "probe-init"
    student_taps = teacher_taps = ("stage2",)
    defaults = {"init_epochs": 2}
    stages_seen: list[tuple[str, int]] = []

    def __init__(self, ctx):
        super().__init__(ctx)
        c_s, c_t = ctx.student_shapes["stage2"][0], ctx.teacher_shapes["stage2"][0]
        self.regressor = torch.nn.Conv2d(c_s, c_t, 1)

    def init_stage(self, student, base_lr):
        from kdbench.methods.base import InitStage

        return InitStage(self.ctx.options["init_epochs"], tuple(self.regressor.parameters()), 0.02,
                         frozen_after=(self.regressor,))

    def losses(self, out: StepOutputs):
        ProbeInit.stages_seen.append((out.stage, out.epoch))
        hint = F.mse_loss(self.regressor(out.student_features["stage2"].detach()).float(),
                          out.teacher_features["stage2"].float())
        return {"hint": hint} if out.stage == "init" else {"ce": self.cross_entropy(out), "hint": hint}
