"""letKD's KD layer and the deployed model it makes ("student + KD layer"): Gorgun, Gurbuz, Alatan, BMVC 2023
(arXiv 2309.02843); adagorgun/letKD-framework ``distillation/architectures/miscellaneous/valueLayer.py``.

The layers stay in the student at inference; :class:`LetKDStudent` is that model, saved and rebuilt with them."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE_NOTE = "student + KD layer"


class CosineConv(nn.Module):
    """Bias-free 1×1 cosine convolution (letKD ``Conv2dCos``): ``scale · cos(w_k, x_i)`` per location and kernel.

    The input is L2-normalised over channels and each kernel over its input dimension, so the output does not
    depend on the input's scale. Kernel init ``normal(0, sqrt(2 / in_channels))``; ``scale`` is a learnable scalar.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1).normal_(0, math.sqrt(2 / in_channels)))
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, p=2.0, dim=1, eps=1e-12)
        w = F.normalize(self.weight, p=2.0, dim=1, eps=1e-12)
        return F.conv2d(x, w * self.scale)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"


class KDLayer(nn.Module):
    """letKD's KD layer (adagorgun/letKD-framework ``valueLayer.py``): template scores ``a``, ``BN → ReLU``,
    semantic vectors, residual ``x + α·v``.

    ``forward(x) -> (x̂, a)``: ``x̂`` has ``x``'s shape and replaces it downstream; ``a`` (``B×K×H×W``) is what the
    teacher supervises. ``alpha`` is a buffer, so a saved state dict describes the layer completely.
    Parameters: ``2·C·K + 2·K + 2``; MACs per image ``H·W·2·C·K``.
    """

    def __init__(self, channels: int, templates: int, alpha: float = 1.0):
        super().__init__()
        self.templates = CosineConv(channels, templates, scale=3.0)
        self.bn = nn.BatchNorm2d(templates)
        self.semantic = CosineConv(templates, channels, scale=1.0)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.templates(x)
        value = self.semantic(F.relu(self.bn(scores)))
        return x + self.alpha * value, scores


def install_kd_layers(student: nn.Module, layers: nn.ModuleDict,
                      sink: dict[str, torch.Tensor] | None = None) -> list:
    """Hooks each KD layer onto the student tap it is named after; the layer's output feeds the forward on.

    The layers follow the student's train/eval mode (their BN statistics update only while the student trains).
    In train mode each layer's template scores are put into ``sink`` under the tap name. Returns the hook handles.
    """
    handles = []
    for name, layer in layers.items():
        tap = student.get_submodule(student.feature_taps[name])

        def hook(tap_module, _inputs, x, name=name, layer=layer):
            if layer.training != tap_module.training:
                layer.train(tap_module.training)
            out, scores = layer(x)
            if sink is not None and tap_module.training:
                sink[name] = scores
            return out

        handles.append(tap.register_forward_hook(hook))
    return handles


class LetKDStudent(nn.Module):
    """The deployed letKD model: the student with its KD layers hooked onto its taps ("student + KD layer").

    ``state_dict`` keys: ``student.*`` (the student's own keys) and ``kd_layers.<tap>.*``. Rebuild a saved one
    with :meth:`from_state_dict`.
    """

    note: ClassVar[str] = ARCHITECTURE_NOTE

    def __init__(self, student: nn.Module, layers: nn.ModuleDict | dict[str, KDLayer]):
        super().__init__()
        self.student = student
        self.kd_layers = layers if isinstance(layers, nn.ModuleDict) else nn.ModuleDict(layers)
        self._handles = install_kd_layers(student, self.kd_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    @classmethod
    def from_state_dict(cls, student: nn.Module, state: dict[str, torch.Tensor]) -> "LetKDStudent":
        """A fresh ``student`` (from ``create_model``) wrapped with layers sized from ``state``, which it loads."""
        layers = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "kd_layers" and parts[2:] == ["templates", "weight"]:
                templates, channels = value.shape[:2]
                layers[parts[1]] = KDLayer(channels, templates, float(state[f"kd_layers.{parts[1]}.alpha"]))
        model = cls(student, layers)
        model.load_state_dict(state, strict=True)
        return model
