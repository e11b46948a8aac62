"""``--compile``: the student's and the frozen models' forwards compiled in place.

Its own module because only compiled runs execute it: kdbench.fingerprint counts it in a run's code only when the
run is compiled, so a change here leaves every eager run's fingerprint (and result) as it was."""

from __future__ import annotations

import torch


def compile_forward(model: torch.nn.Module, mode: str | None) -> None:
    """Compiles ``model.forward`` in place (``mode``: a torch.compile mode; None leaves it eager). Its state dict is
    unchanged, hooks on its layers (feature taps) are compiled with it, and hooks on the model itself run outside
    the compiled code, where the profiler's clock can read the time. One static graph per input shape and mode."""
    if mode is not None:
        model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
