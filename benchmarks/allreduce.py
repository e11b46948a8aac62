"""The per-step all-reduce of a run across processes, alone: ``torchrun --nproc-per-node N benchmarks/allreduce.py
MODEL`` all-reduces a flat fp32 tensor the size of MODEL's parameters (what kdbench.distributed.average_ sends after
each backward), NCCL on GPUs and gloo on CPUs, and rank 0 prints one JSON line: the median milliseconds of
``REPEATS`` all-reduces after ``WARMUP``, and the bus bandwidth (NCCL-tests' definition: size x 2(N - 1)/N over
the time)."""

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from kdbench.models import create_model

WARMUP, REPEATS = 5, 30


def main(model: str) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    numel = sum(p.numel() for p in create_model(model, 1000, 3).parameters())
    flat = torch.ones(numel, device="cuda" if cuda else "cpu")
    times = []
    for k in range(WARMUP + REPEATS):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        dist.all_reduce(flat)
        if cuda:
            torch.cuda.synchronize()
        if k >= WARMUP:
            times.append(time.perf_counter() - started)
    n = dist.get_world_size()
    if dist.get_rank() == 0:
        seconds = statistics.median(times)
        print(json.dumps({"model": model, "processes": n, "backend": dist.get_backend(), "megabytes": numel * 4 / 1e6,
                          "allreduce_ms": 1000 * seconds,
                          "bus_gb_per_s": numel * 4 * 2 * (n - 1) / n / seconds / 1e9}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tv_resnet18")
