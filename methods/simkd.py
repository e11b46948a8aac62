"""``simkd``: Chen, Mei, Zhang, Wang, Wang, Feng, Chen, "Knowledge Distillation with the Reused Teacher Classifier",
CVPR 2022 (arXiv 2203.14001).

The student keeps no classifier of its own: a projector maps its last feature map onto the teacher's, trained with
a mean squared error alone, and the deployed model classifies the projected map with the teacher's frozen
classifier. Official code DefangChen/SimKD: ``models/util.py::SimKD`` (the projector and the prediction),
``helper/loops.py`` (``train_distill``, ``validate_distill``), ``train_student.py`` and ``scripts/run_distill.sh``
(``--distill simkd -c 0 -d 0 -b 1``, ``--factor`` 2).

- Features: the last stage of each model (``stageK``, SimKD's ``feat[-2]``). The larger map is average-pooled to the
  smaller one's size (the student's before the projector, the teacher's as the target).
- Projector (``transfer``, named and laid out as the official one, so its state dicts load): 1×1 conv C_s → C_t/f,
  BN, ReLU, 3×3 conv C_t/f → C_t/f, BN, ReLU, 1×1 conv C_t/f → C_t, BN, ReLU; convs without bias; f = ``factor``.
- Loss: ``beta·MSE(projected student map, teacher map)`` with CE and KD at weight 0 (``-c 0 -d 0 -b 1``).
- Prediction: global average pooling of the projected map, then the teacher's classifier (a frozen copy, made by
  ``prepare`` from the teacher and kept in the method's state, so a resumed run has it). The student's forward is
  hooked to return it, in training (its accuracy, as the official ``logit_s = pred_feat_s``) and in evaluation.

The deployed model (:meth:`SimKD.export`) is the student, the projector and the teacher's classifier: its
``inference_params`` and ``inference_macs`` count all three. The student's own classifier is computed and unused, as
in the official validation, and stays in the saved weights, as in the official checkpoint (``model`` and ``proj``).
SimKD is one objective under every protocol: its authors fix CE and KD at 0, and a CE or KD term would train the
student's own classifier, which is not deployed. A teacher whose classifier does not read its last stage's channels
(MobileNetV2 and ShuffleNets, whose head convolution comes after the last stage) is refused when the sweep is planned.
On several processes (kdbench.distributed) rank 0 copies the teacher's classifier and the others load it from there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.base import AT_LEAST_ONE, LOGIT_OPTIONS, NON_NEGATIVE, Method, Preparation, StepOutputs
from kdbench.methods.heads import classifier_of
from kdbench.models.taps import stage_names

SIMKD_OBJECTIVE = {"ce_weight": 0.0, "kd_weight": 0.0}  # the MSE alone (-c 0 -d 0 -b 1)


def projector(student_channels: int, teacher_channels: int, factor: int) -> nn.Sequential:
    """SimKD's bottleneck projector (``models/util.py::SimKD.transfer``)."""
    middle = teacher_channels // factor
    return nn.Sequential(
        nn.Conv2d(student_channels, middle, 1, bias=False), nn.BatchNorm2d(middle), nn.ReLU(inplace=True),
        nn.Conv2d(middle, middle, 3, padding=1, bias=False), nn.BatchNorm2d(middle), nn.ReLU(inplace=True),
        nn.Conv2d(middle, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels), nn.ReLU(inplace=True))


@register_method
class SimKD(Method):
    """``beta·MSE(projector(f_s), f_t)``, predictions by the teacher's classifier (Chen et al., CVPR 2022;
    DefangChen/SimKD); the same objective under every protocol."""

    name = "simkd"
    family = "layer-adding"
    defaults = {**LOGIT_OPTIONS, **SIMKD_OBJECTIVE, "beta": 1.0, "factor": 2}
    ranges = {**Method.ranges, "beta": NON_NEGATIVE, "factor": AT_LEAST_ONE}
    presets = {"official": SIMKD_OBJECTIVE, "crd": SIMKD_OBJECTIVE, "semckd": SIMKD_OBJECTIVE}

    def __init__(self, ctx):
        super().__init__(ctx)
        student_tap, teacher_tap = stage_names(ctx.student_shapes)[-1], stage_names(ctx.teacher_shapes)[-1]
        self.student_taps, self.teacher_taps = (student_tap,), (teacher_tap,)
        (c_s, h_s, _), (c_t, h_t, _) = ctx.student_shapes[student_tap], ctx.teacher_shapes[teacher_tap]
        if ctx.teacher_shapes["pooled"][0] != c_t:
            raise KdbenchError(f"simkd reuses the teacher's classifier on its last stage ({teacher_tap}, {c_t} "
                               f"channels), but this teacher's classifier reads {ctx.teacher_shapes['pooled'][0]}; "
                               "use a teacher whose classifier pools its last stage (ResNets, WRNs, VGGs)")
        factor = ctx.options["factor"]
        if c_t // factor < 1:
            raise KdbenchError(f"simkd.factor={factor} leaves no channel of the teacher's {c_t}; use at most {c_t}")
        self.student_size, self.teacher_size = h_s, h_t
        self.transfer = projector(c_s, c_t, factor)
        self.classifier = nn.Linear(c_t, ctx.num_classes).requires_grad_(False)  # the teacher's, copied by prepare
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._projected: torch.Tensor | None = None
        self._handles: list = []
        self._deployed: SimKDStudent | None = None

    def prepare(self, prep: Preparation) -> None:
        head = classifier_of(prep.teacher_model, self.classifier.in_features, self.classifier.out_features)
        with torch.no_grad():
            self.classifier.weight.copy_(head.weight)
            self.classifier.bias.copy_(head.bias)
        self.fitted.fill_(True)

    def predict(self, student_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected map, logits) from the student's last-stage map (``SimKD.forward``)."""
        if self.student_size > self.teacher_size:
            student_map = F.adaptive_avg_pool2d(student_map, (self.teacher_size, self.teacher_size))
        projected = self.transfer(student_map)
        return projected, self.classifier(torch.flatten(F.adaptive_avg_pool2d(projected, 1), 1))

    def hook(self, student: nn.Module) -> list:
        """Hooks that make ``student``'s forward return the SimKD prediction; the projector follows the student's
        train/eval mode, and in training the projected map is kept for :meth:`losses`."""
        captured: dict[str, torch.Tensor] = {}
        tap = student.get_submodule(student.feature_taps[self.student_taps[0]])

        def keep(_tap, _inputs, x):
            captured["map"] = x

        def replace(model, _inputs, _own_logits):
            if self.transfer.training != model.training:
                self.transfer.train(model.training)
            projected, logits = self.predict(captured.pop("map"))
            if model.training:
                self._projected = projected
            return logits

        return [tap.register_forward_hook(keep), student.register_forward_hook(replace)]

    def attach(self, student: nn.Module) -> None:
        self._handles = self.hook(student)

    def extra_params_inference(self) -> int:
        return sum(p.numel() for p in (*self.transfer.parameters(), *self.classifier.parameters()))

    def export(self, student: nn.Module) -> nn.Module:
        """The deployed model (one per student: the training hooks hand over to it once)."""
        if self._deployed is None or self._deployed.student is not student:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            # Not a submodule of the method: the student's parameters must not count as (or train as) the method's.
            object.__setattr__(self, "_deployed", SimKDStudent(student, self))
        return self._deployed

    def losses(self, out: StepOutputs):
        if not bool(self.fitted):
            raise RuntimeError("simkd: prepare() has not copied the teacher's classifier")
        projected, self._projected = self._projected, None
        if projected is None:
            raise RuntimeError("simkd: no projected map from the student's forward (attach() not called)")
        target = out.teacher_features[self.teacher_taps[0]].detach()
        if self.teacher_size > self.student_size:
            target = F.adaptive_avg_pool2d(target, (self.student_size, self.student_size))
        with torch.autocast(device_type=projected.device.type, enabled=False):
            mse = F.mse_loss(projected.float(), target.float())
        return {**self.logit_terms(out), "simkd": self.ctx.options["beta"] * mse}


class SimKDStudent(nn.Module):
    """The deployed SimKD model: the student, whose forward returns the prediction of the projector and the teacher's
    classifier. ``state_dict`` keys: ``student.*``, ``transfer.*`` (as the official ``proj``) and
    ``classifier.*``."""

    def __init__(self, student: nn.Module, method: SimKD):
        super().__init__()
        self.student = student
        self.transfer, self.classifier = method.transfer, method.classifier
        self._handles = method.hook(student)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)
