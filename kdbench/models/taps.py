"""Architecture-agnostic feature access.

Every zoo model calls parameter-free :class:`Tap` modules at its canonical feature points
(``stem``, ``stage1`` .. ``stageK``, ``stage1_preact`` .., ``pooled``) and declares where they sit in
``model.feature_taps`` (canonical name -> module path). Methods read features through
:class:`FeatureExtractor`, which attaches forward hooks to those taps, so no method knows an
architecture. Taps hold no state, so checkpoints keep RepDistiller's exact key set.

Where a BatchNorm precedes the ReLU of a stage's preact tap, the model names it in ``model.preact_bn``
(``stageK_preact`` -> module path; OFD's margins read its affine parameters). ShuffleNets declare none.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn


class Tap(nn.Identity):
    """A named point in a forward pass where a feature can be read (or, by a hook, replaced)."""

    @property
    def active(self) -> bool:
        """True when someone listens; models skip computing optional tensors for silent taps."""
        return bool(self._forward_hooks)


def tap_modules(model: nn.Module) -> dict[str, Tap]:
    """The model's canonical taps, by canonical name."""
    return {name: model.get_submodule(path) for name, path in model.feature_taps.items()}


def stage_names(taps: nn.Module | Iterable[str]) -> list[str]:
    """``stage1`` .. ``stageK``: the stage outputs that feature methods use, shallow to deep.

    ``taps``: a zoo model, or tap names such as the keys of a feature-shape dict.
    """
    names = taps.feature_taps if isinstance(taps, nn.Module) else taps
    matches = [(int(m.group(1)), name) for name in names if (m := re.fullmatch(r"stage(\d+)", name))]
    return [name for _, name in sorted(matches)]


class FeatureExtractor:
    """Runs a model and returns ``(logits, {tap name: tensor})`` for the requested taps."""

    def __init__(self, model: nn.Module, names: tuple[str, ...] | list[str] = ()):
        unknown = sorted(set(names) - set(model.feature_taps))
        if unknown:
            raise KeyError(f"{type(model).__name__} has no taps {unknown}; it has {list(model.feature_taps)}")
        self.model = model
        self.names = tuple(names)
        self._features: dict[str, torch.Tensor] = {}
        taps = tap_modules(model)
        self._handles = [taps[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str):
        def keep(_module, _inputs, output):
            self._features[name] = output

        return keep

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._features = {}
        logits = self.model(x)
        features, self._features = self._features, {}
        return logits, features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def feature_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Shape (without batch) of every tap and of ``logits`` for one input of ``input_shape``.

    Runs a batch of two in eval mode on the model's device so training state is untouched.
    """
    was_training = model.training
    device = next(model.parameters()).device
    extractor = FeatureExtractor(model, list(model.feature_taps))
    try:
        model.eval()
        logits, features = extractor(torch.zeros(2, *input_shape, device=device))
    finally:
        extractor.remove()
        model.train(was_training)
    shapes = {name: tuple(t.shape[1:]) for name, t in features.items()}
    shapes["logits"] = tuple(logits.shape[1:])
    return shapes
