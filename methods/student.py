"""``student``: the cross-entropy baseline every distillation method is compared against."""

from __future__ import annotations

from kdbench.methods import register_method
from kdbench.methods.base import Method, StepOutputs


@register_method
class Student(Method):
    """Trains the model alone with cross-entropy; also how kdbench trains teachers."""

    name = "student"
    family = "baseline"
    needs_teacher = False

    def losses(self, out: StepOutputs):
        return {"ce": self.cross_entropy(out)}
