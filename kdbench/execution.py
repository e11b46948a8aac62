"""What the harness does to a model besides training it: load its weights, run it in the run's precision, evaluate
it, and normalise with batch statistics. Shared by the harness, the dry run and the profiler."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from kdbench.errors import KdbenchError
from kdbench.loader import DeviceLoader
from kdbench.spec import RunSpec


def load_weights(model: torch.nn.Module, path: Path, what: str) -> None:
    """Loads a plain state dict or a RepDistiller checkpoint (weights under ``model``) with strict=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise KdbenchError(f"cannot read {what} {path}: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise KdbenchError(f"{what} {path} holds no state dict (expected a dict, or one under the key 'model')")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise KdbenchError(f"{what} {path} does not fit {type(model).__name__}: {detail[:300]}") from None


@contextlib.contextmanager
def batch_statistics(models, enabled: bool = True):
    """Inside, the BatchNorms of ``models`` normalise with the batch's statistics and leave their running statistics
    and counters as they are (train mode without tracking); outside, they are as before."""
    norms = [m for model in models for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if enabled else []
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.training, m.track_running_stats = training, tracking


def autocast(spec: RunSpec, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DeviceLoader, spec: RunSpec, device: torch.device,
             split: str = "test") -> dict[str, float]:
    """Top-1/top-5 (%) on the test set (or ``split="val"``: the validation split) in eval mode, and evaluation
    throughput."""
    model.eval()
    correct = torch.zeros(2, device=device)
    seen = 0
    started = time.perf_counter()
    for x, y in loader.test_batches(split):
        with autocast(spec, device):
            logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
        seen += len(y)
    top1, top5 = (100.0 * correct / seen).tolist()
    elapsed = time.perf_counter() - started
    return {"top1": top1, "top5": top5, "eval_s": elapsed, "eval_images_per_s": seen / elapsed}
