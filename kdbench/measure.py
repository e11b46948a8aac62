"""Measurements a run records: step timing without host syncs, peak memory, provenance."""

from __future__ import annotations

import platform
import resource
import socket
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import kdbench


class StepTimer:
    """Times training steps: CUDA events on GPU (read once per epoch), perf_counter on CPU.

    Steps before ``warmup_steps`` (counted over the whole run) are excluded from the steady state.
    """

    def __init__(self, device: torch.device, warmup_steps: int):
        self.cuda = device.type == "cuda"
        self.warmup_steps = warmup_steps
        self.steps_seen = 0
        self._pending: list = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started, images: int) -> None:
        measured = self.steps_seen >= self.warmup_steps
        self.steps_seen += 1
        if not measured:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((started, end, images))
        else:
            self._pending.append((time.perf_counter() - started, images))

    def flush(self) -> list[tuple[float, int]]:
        """Resolves the epoch's steps (one device sync on GPU); returns (seconds, images) per step."""
        if self.cuda and self._pending:
            self._pending[-1][1].synchronize()
            resolved = [(start.elapsed_time(end) / 1000.0, n) for start, end, n in self._pending]
        else:
            resolved = list(self._pending)
        self._pending = []
        return resolved


def reset_peak_memory(device: torch.device) -> None:
    """Starts a fresh peak: CUDA allocator statistics, or the kernel's RSS high-water mark on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets VmHWM (Linux >= 4.0); elsewhere the process-lifetime peak is reported
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_alloc_bytes": float(torch.cuda.max_memory_allocated(device)),
                "peak_reserved_bytes": float(torch.cuda.max_memory_reserved(device))}
    return {"cpu_peak_rss_bytes": float(_peak_rss_bytes())}


def peak_bytes(device: torch.device) -> float:
    """The peak that ``peak_memory`` leads with: CUDA max allocated, or the CPU's peak RSS."""
    return next(iter(peak_memory(device).values()))


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@torch.no_grad()
def macs_per_image(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """Multiply-accumulates of one eval-mode forward (convolutions and matmuls, as the reference tables count)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    from kdbench.errors import KdbenchError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise KdbenchError(f"unknown device {name!r}; valid devices: auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise KdbenchError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


def _git(*args: str, cwd: Path = Path(__file__).resolve().parent) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_changed(cwd: Path = Path(__file__).resolve().parent) -> bool | None:
    """Whether the checkout that holds ``cwd`` (kdbench's own) has uncommitted changes to its Python code; None
    outside a git checkout. Other files do not count: a run records its spec whole, and re-making a committed run
    rewrites that run's own result files before its provenance is taken."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":/*.py", cwd=cwd)
    return bool(status) if status is not None else None


def provenance(device: torch.device) -> dict[str, object]:
    """Where and with what a run was produced; stored in every results row."""
    cuda = device.type == "cuda"
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": code_changed(),
        "kdbench_version": kdbench.__version__,
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_metrics(history: list[dict[str, float]], step_times: list[tuple[float, int]],
                 device: torch.device, processes: int = 1) -> dict[str, float]:
    """Run-level accuracy (main-stage epochs), steady-state speed and memory (the main stage's steps) and wall time
    (every epoch) from the per-epoch history and step timings; for a run of several ``processes``, the global img/s
    (the global batch per step), and per device, and the peak memory of all processes together."""
    trained = [h for h in history if h["epoch"] >= 1]  # the main stage's epochs
    main = [h for h in trained if "top1" in h]  # those evaluated (Recipe.eval_every): the last always is
    best = max(main, key=lambda h: h["top1"])
    last = main[-1]
    if "val_top1" in last:  # selection on the validation split: the first epoch of its best top-1
        chosen = max(main, key=lambda h: h["val_top1"])
        selected = {"top1_at_best_val": chosen["top1"], "top1_at_best_val_epoch": float(chosen["epoch"]),
                    "val_top1_best": chosen["val_top1"], "val_top1_last": last["val_top1"]}
    else:
        selected = {}
    metrics = {**selected, "top1_best": best["top1"], "top1_best_epoch": float(best["epoch"]),
               "top1_last": last["top1"],
               "top5_best": max(h["top5"] for h in main), "top5_last": last["top5"],
               "epochs_completed": float(len(trained)), **({"init_epochs": float(len(history) - len(trained))}
                                                            if len(trained) < len(history) else {}),
               "wall_s": sum(h["epoch_s"] + h["eval_s"] for h in history),
               "cpu_s": sum(h["epoch_cpu_s"] for h in history),
               "frozen_forwards_per_step": statistics.fmean(h["frozen_forwards_per_step"] for h in history),
               "eval_images_per_s": statistics.median(h["eval_images_per_s"] for h in history
                                                      if "eval_images_per_s" in h)}
    if step_times:
        seconds = [s for s, _ in step_times]
        quartiles = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
        metrics.update(train_images_per_s=sum(n for _, n in step_times) / sum(seconds),
                       **({"train_images_per_s_per_device": sum(n for _, n in step_times) / sum(seconds) / processes}
                          if processes > 1 else {}),
                       step_ms_median=1000 * quartiles[1], step_ms_iqr=1000 * (quartiles[2] - quartiles[0]))
    metrics.update(peak_memory(device))  # this process's (rank 0's), and all processes' together:
    if processes > 1:
        metrics["peak_bytes_all_processes"] = max(h["peak_bytes_all_processes"] for h in history)
    return metrics
