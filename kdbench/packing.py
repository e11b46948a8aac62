"""``--runs-per-gpu K``: K runs share one GPU, as Ray fractional GPU resources (1/K GPU a run).

A CIFAR-sized run leaves most of an H100 idle (launch-bound at batch 64: docs/performance.md), so a sweep's
throughput, images per second summed over its runs, grows with runs per GPU until the device is busy. Ray schedules
the runs, on a cluster (``--executor ray``) or on this machine (the local executor starts a local Ray cluster when
K > 1); kdbench writes no scheduler of its own. A shared run computes what it computes alone: only its speed differs,
so its record says how many runs could share its device (``device_shared_by``) and reports never average its img/s
with a dedicated run's (kdbench.report.load).

Memory is checked first: each setting's peak is measured (kdbench.estimate, the dry run's measurement, whose price
cache keeps it), and a setting whose K runs with their CUDA contexts would not fit in the GPU's memory is packed
fewer to a GPU; a run that does not fit alone is refused. A run packed k to a GPU asks for 1/k of one, and k of it
fit; Ray keeps the fractions on a GPU at most 1, so any mix of settings on one GPU fits too.
"""

from __future__ import annotations

import importlib.util
import math

from kdbench.errors import KdbenchError
from kdbench.progress import log

# What each process holds on a GPU beyond the caching allocator's peak: the CUDA context, cuBLAS and cuDNN
# workspaces (about 0.5-0.8 GiB on an H100 with torch 2.x); rounded up.
CONTEXT_BYTES = 2**30
USABLE = 0.95  # of the device's memory: fragmentation and the driver's own share
GIB = 2**30


def check(runs_per_gpu: int, device: str, world_size: int) -> None:
    """``--runs-per-gpu`` as given: a positive integer; above 1 only for CUDA runs of one process each, with Ray."""
    if runs_per_gpu < 1:
        raise KdbenchError(f"--runs-per-gpu must be a positive integer, got {runs_per_gpu}")
    if runs_per_gpu == 1:
        return
    if device != "cuda":
        raise KdbenchError(f"--runs-per-gpu {runs_per_gpu} shares a GPU, but the runs are on {device}; on CPUs, "
                           f"run several at once with --executor ray --ray-cpus N (threads per run)")
    if world_size > 1:
        raise KdbenchError(f"--runs-per-gpu {runs_per_gpu} with --gpus-per-run {world_size}: a run trained by "
                           f"several processes takes whole GPUs; give one of the two")
    if importlib.util.find_spec("ray") is None:
        raise KdbenchError("--runs-per-gpu schedules the runs with Ray: pip install 'kdbench[ray]'")


def runs_that_fit(peak_bytes: float, capacity_bytes: float, runs_per_gpu: int) -> int:
    """How many runs whose peak is ``peak_bytes`` share a device of ``capacity_bytes``: ``runs_per_gpu`` or fewer,
    0 when even one does not fit."""
    return min(runs_per_gpu, math.floor(USABLE * capacity_bytes / (peak_bytes + CONTEXT_BYTES)))


def shares(peaks: dict[str, float], capacity_bytes: float | None, runs_per_gpu: int) -> dict[str, int]:
    """Run id -> runs sharing its GPU, from each run's measured peak (``peaks``); ``capacity_bytes`` None: no
    memory to check (a CPU run on fake GPUs in tests). Refuses, in one line, a run that does not fit alone."""
    if capacity_bytes is None:
        return {run_id: runs_per_gpu for run_id in peaks}
    packed = {run_id: runs_that_fit(peak, capacity_bytes, runs_per_gpu) for run_id, peak in peaks.items()}
    too_big = [run_id for run_id, k in packed.items() if k == 0]
    if too_big:
        run_id = too_big[0]
        raise KdbenchError(f"run {run_id} measured a peak of {peaks[run_id] / GIB:.1f} GiB, which with its CUDA "
                           f"context does not fit the GPU's {capacity_bytes / GIB:.1f} GiB even alone"
                           + (f" (and {len(too_big) - 1} more runs)" if len(too_big) > 1 else ""))
    return packed


def packing_lines(peaks: dict[str, float], packed: dict[str, int], runs_per_gpu: int) -> list[str]:
    """What the packing changed: the runs packed fewer than asked, with their peaks."""
    fewer = {run_id: k for run_id, k in packed.items() if k < runs_per_gpu}
    return [f"{run_id}: {k} per GPU, not {runs_per_gpu} (measured peak {peaks[run_id] / GIB:.1f} GiB + "
            f"{CONTEXT_BYTES / GIB:.0f} GiB of CUDA context each)" for run_id, k in fewer.items()]


def device_capacity(device: str) -> float | None:
    """The memory of the GPU the runs share (every GPU of a node is taken to be this one's model), or None on a
    CPU."""
    if device != "cuda":
        return None
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory)


def room(device: str) -> float | None:
    """What the runs share of the first GPU: its memory less this process's own CUDA context (the sweep's driver,
    which measured the peaks); None on a CPU."""
    capacity = device_capacity(device)
    return capacity - CONTEXT_BYTES if capacity else None


def dry_run_text(est, runs_per_gpu: int) -> str:
    """What the dry run adds for a packed sweep (``est``: a kdbench.estimate.Estimate): the runs packed fewer, and
    the sweep's GPU-hours as bounds, from the runs' prices alone: if sharing cost a run nothing (1/k of a GPU for as
    long as it takes alone) and if it gained nothing (a GPU each). The real gain lies between; `make gpu-check`
    measures it."""
    if runs_per_gpu == 1:
        return ""
    runs = [r for r in est.runs if r.seconds > 0]
    peaks = {r.run_id: r.peak_bytes for r in runs}
    packed = shares(peaks, room(est.devices[0]) if est.devices else None, runs_per_gpu)
    alone = sum(r.seconds for r in runs) / 3600
    shared = sum(r.seconds / packed[r.run_id] for r in runs) / 3600
    fewer = packing_lines(peaks, packed, runs_per_gpu)
    return (f"\n\npacked {runs_per_gpu} runs per GPU: between {shared:.3g} GPU-hours (if sharing cost each run "
            f"nothing) and {alone:.3g} (if it gained nothing); the runs' prices above are their times alone"
            + "".join(f"\npacked fewer: {line}" for line in fewer))


def pack(specs: list, env, runs_per_gpu: int) -> dict[str, int]:
    """Run id -> runs sharing its GPU, for a sweep about to start: each setting's peak is measured as the dry run
    measures it (its price cache reused; a method's offline fit on a few batches only), and the runs packed fewer
    than asked are said. This process keeps a CUDA context on the first GPU beside the runs: counted."""
    import torch

    from kdbench.estimate import PriceCache, estimate

    if runs_per_gpu == 1 or not specs:
        return {}
    try:
        peaks = {r.run_id: r.peak_bytes for r in estimate(specs, env, prices=PriceCache.default()).runs}
    except torch.OutOfMemoryError:
        raise KdbenchError("measuring the runs' peak memory before packing them ran out of GPU memory: a setting "
                           "does not fit the GPU even alone; run it with a smaller --batch-size") from None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    packed = shares(peaks, room(specs[0].device), runs_per_gpu)
    for line in packing_lines(peaks, packed, runs_per_gpu):
        log.warning("packed fewer: %s", line)
    return packed
