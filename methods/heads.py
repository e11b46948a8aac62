"""The classifier of a zoo model, for methods that reuse a model's head on feature maps (SimKD's teacher
classifier, CAT-KD's class activation maps)."""

from __future__ import annotations

from torch import nn

from kdbench.errors import KdbenchError


def classifier_of(model: nn.Module, in_features: int, num_classes: int) -> nn.Linear:
    """``model``'s classifier: its last ``nn.Linear`` from ``in_features`` to ``num_classes`` (every zoo model ends with
    one, whatever its name: ``fc``, ``classifier``, ``linear``), reading the global pooling of its ``pre_pool`` map."""
    heads = [m for m in model.modules()
             if isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (in_features, num_classes)]
    if not heads:
        raise KdbenchError(f"no {in_features} -> {num_classes} linear classifier in {type(model).__name__}")
    return heads[-1]
