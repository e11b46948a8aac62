"""``--compile``: the student's and the frozen models' forwards compiled in place.

Its own module because only compiled runs execute it: kdbench.fingerprint counts it in a run's code only when the
run is compiled, so a change here leaves every eager run's fingerprint (and result) as it was."""

from __future__ import annotations

import torch


def compile_forward(model: torch.nn.Module, mode: str | None) -> None:
    """Compiles ``model.forward`` in place (``mode``: a torch.compile mode; None leaves it eager). Its state dict is
    unchanged, hooks on its layers (feature taps) are compiled with it, and hooks on the model itself run outside
    the compiled code, where the profiler's clock can read the time. One static graph per input shape and mode.

    Dynamo reuses a compiled forward for every instance of the class and, by default, without checking the hooks on
    its layers: in a sweep, the second method's students and teachers would run the first method's code, without
    their own feature taps (semckd after kd lost its stage maps: tests/test_compile.py). So each run starts from
    Dynamo's empty cache (its models are compiled before any of them runs; Inductor's on-disk cache keeps recompiling
    cheap), which also keeps a sweep of many runs under Dynamo's recompile limit, past which it would fall back to
    eager code with only a warning; and Dynamo guards on the hooks."""
    if mode is not None:
        torch._dynamo.reset()  # compiled code is made at a forward's first call: none of this run's is lost
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
