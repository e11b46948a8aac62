"""One run across several processes: torch.distributed data parallelism, as launched by torchrun, SLURM's srun with
torchrun, torch's elastic launcher (``--gpus-per-run``) or Ray Train. kdbench starts no processes of its own and
builds no collective of its own beyond averaging or broadcasting a list of tensors.

Semantics (issue 27):

- ``--batch-size`` is the global batch. Batch k of an epoch is the same images whatever the world size; rank r
  trains on positions k·B + r, k·B + r + N, … of the epoch's order (``loader.BatchCounts.ranks``), which is what
  DistributedSampler gives each rank, taken batch by batch.
- Gradients are averaged across ranks after each backward (``Method.average_gradients``), as DDP's all-reduce
  does, so N ranks on B/N images take the step one process takes on B (for a loss that is a batch mean and, with
  ``--sync-bn``, BatchNorm statistics over the whole batch). kdbench averages them itself rather than wrapping the
  student in DistributedDataParallel because a method owns its backward (``Method.step``: DOT takes the gradient of
  its two terms apart), and DDP's wrapper allows one backward per forward; the price is no overlap of the all-reduce
  with the backward.
- BatchNorm is per rank by default (each rank normalises with its own shard's statistics, as DataParallel and the
  official codes train); ``--sync-bn`` converts it to torch's SyncBatchNorm on CUDA, and to ``SyncBatchNormCPU``
  (the same statistics, through a differentiable all-reduce) where torch has no CPU kernels for it (gloo).
- A method's offline fit (``Method.prepare``: letKD's k-means, SAKD's prefit head, a copy of the teacher's
  classifier) runs once, on rank 0, over whole batches as one process fits it, and its state is broadcast to the
  other ranks (``fit_once``), which wait meanwhile: every rank trains with the fit one process makes, and no cache
  of fitted artefacts is written twice.
- Running statistics: evaluation uses rank 0's, broadcast before each evaluation (DDP broadcasts rank 0's buffers
  at every forward; DataParallel keeps replica 0's).
- Only rank 0 writes records, tables and checkpoints, and holds the run's claim for the group.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

from kdbench.errors import KdbenchError, RunFailed


@dataclass(frozen=True)
class World:
    """This process's place in its run's process group: rank ``rank`` of ``size`` (one process: 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "World":
        """The initialised process group's, else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def launched_world_size() -> int:
    """The world size a launcher (torchrun, srun + torchrun, the elastic launcher) set for this process; 1 if none."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise KdbenchError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


# What the elastic launcher (``launch``) and its group's processes tell each other through the environment: the file
# where rank 0 writes the run it announces, and the runs that failed in the sweep's earlier groups.
ANNOUNCED_FILE, FAILED_RUNS = "KDBENCH_GROUP_ANNOUNCED", "KDBENCH_GROUP_FAILED"


def launch(processes: int, device: str, argv: list[str], record_failure: Callable[[dict, str], str | None]) -> int:
    """Runs this same command as ``processes`` processes of one process group, started by torch's elastic launcher
    (what torchrun runs), each of which trains every run of the sweep together (kdbench.distributed).

    A process that raises inside a run fails that run, not the sweep: ``record_failure(spec dict, reason)`` records
    it and returns its run id (None: the run had finished, so the error came between runs), and a new group goes on
    with the sweep's other runs. A process that dies (a signal, kill -9) stops the group, and the same command
    resumes. Returns the exit code: 0, or 1 when a run failed or the group stopped."""
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if device == "cuda" and processes > torch.cuda.device_count():
        raise KdbenchError(f"--gpus-per-run {processes}, and this machine has {torch.cuda.device_count()} GPU(s)")
    if device == "cpu":  # the cores shared out, as torchrun does (one thread each)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    failed: list[str] = []
    # the variables the group's processes inherit, set for them only: this process's environment is restored after
    with tempfile.TemporaryDirectory(prefix="kdbench-group-") as folder, mock.patch.dict(os.environ):
        announced = Path(folder) / "announced.json"
        os.environ[ANNOUNCED_FILE] = str(announced)
        while True:
            os.environ[FAILED_RUNS] = ",".join(failed)
            config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                                  rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
            try:
                elastic_launch(config, sys.executable)("-m", "kdbench", *argv)
                return 1 if failed else 0
            except ChildFailedError as error:
                rank, failure = error.get_first_failure()  # the others were stopped because of it
                raised = isinstance(failure.message, dict)
                if not raised and failure.exitcode in (1, 2):  # a sweep with failed runs, or a user error: rank 0
                    return 1  # said so
                message = failure.message.get("message") if raised else failure.message
                why = " ".join(str(message or f"exit code {failure.exitcode}").split())[:300]
                spec = json.loads(announced.read_text()) if raised and announced.is_file() else None
                announced.unlink(missing_ok=True)
                run = spec and record_failure(spec, f"process {rank} of {processes} raised {why}")
                if run:
                    failed.append(run)
                    print(f"kdbench: error: process {rank} of {processes} failed run {run}: {why}; it is recorded as "
                          f"failed, and a new process group goes on with the sweep", file=sys.stderr)
                    continue
                print(f"kdbench: error: process {rank} of {processes} stopped the run's group: {why}; the same "
                      f"command resumes from the last epoch checkpoint", file=sys.stderr)
                return 1


def failed_in_earlier_groups() -> set[str]:
    """The runs of this sweep that failed in an earlier process group of the launcher (``launch``): a new group
    leaves them out."""
    return {run for run in os.environ.get(FAILED_RUNS, "").split(",") if run}


def join(device: torch.device) -> World:
    """Joins the process group the launcher set up (env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE),
    NCCL on CUDA and gloo on CPUs, once per process, and a gloo group of its own for rank 0's announcements, whose
    long timeout lets the others wait while rank 0 works outside any collective (waiting for another sweep's
    claim, loading ImageNet's index); one process joins none."""
    global _control
    if launched_world_size() == 1:
        return World.current()
    if not dist.is_initialized():  # torchrun, the elastic launcher; Ray Train has set it up itself
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if name not in os.environ]
        if missing:
            raise KdbenchError(f"WORLD_SIZE={launched_world_size()} is set but {', '.join(missing)} is not: launch "
                               f"the processes with torchrun (or --gpus-per-run), which sets them all")
        if device.type == "cuda":
            local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= gpus:
                raise KdbenchError(f"process {local} of this node has no GPU of its own: the node has {gpus}; "
                                   f"launch at most {gpus} processes per node")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if _control is None:
        _control = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return World.current()


_control = None  # the announcements' group (join)


def announce(spec) -> None:
    """Rank 0, about to train ``spec`` (a RunSpec; None: the sweep is over), tells the other processes, which
    train it with it (``follow``); nothing in one process. Rank 0 alone decides which runs to train (what is
    finished, claimed elsewhere or to resume), so the group never disagrees."""
    world = World.current()
    if world.size > 1 and world.main:
        message = None if spec is None else spec.to_dict()
        if message and os.environ.get(ANNOUNCED_FILE):  # for the launcher: it records the run if a process raises
            Path(os.environ[ANNOUNCED_FILE]).write_text(json.dumps(message))
        dist.broadcast_object_list([message], src=0, group=_control)


def leave() -> None:
    """Ends this process's part in its process group (before exit: a group left to the interpreter's teardown can
    abort the process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def follow(train: Callable[[Any], None]) -> None:
    """A process of rank > 0: trains each run rank 0 announces, with ``train(spec)``, until the sweep is over. A
    RunFailed (a non-finite loss, which every process sees at the same step) ends the run on every process, and
    rank 0 records it; any other error ends this process, and the launcher stops the group."""
    from kdbench.spec import RunSpec

    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=_control)
        if message[0] is None:
            return
        try:
            train(RunSpec.from_dict(message[0]))
        except RunFailed:
            pass


def seed_process(seed: int, epoch: int, world: World) -> None:
    """In a run of several processes, each epoch's random draws on the devices (dropout) come from a stream of
    the process's own, seeded by (run seed, epoch, rank): processes do not draw the same masks for different
    images, and a resumed run draws what it would have drawn. One process keeps one stream for the whole run."""
    if world.size > 1:
        from kdbench.loader import stream_seed

        torch.manual_seed(stream_seed(seed, epoch, f"process {world.rank}"))


def group_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """A run's provenance (``measure.provenance``, rank 0's) with, for a run trained by several processes, the
    process group's backend and every process's device model (the world size is the spec's)."""
    world = World.current()
    if world.size == 1:
        return provenance
    names: list[Any] = [None] * world.size
    dist.all_gather_object(names, provenance["device_name"])
    return {**provenance, "process_group_backend": dist.get_backend(),
            "device_names": "; ".join(f"{n} x{names.count(n)}" for n in dict.fromkeys(names))}


def average_(tensors: list[torch.Tensor | None], world: World) -> None:
    """Averages ``tensors`` (gradients) in place across the ranks, in one all-reduce of their concatenation per
    dtype (in a fixed order). Every process must have a gradient for the same parameters: a parameter with one on
    some processes and not on others ends the run on all of them (RunFailed), rather than pairing the wrong
    tensors; one none has is left as it is."""
    if world.size == 1:
        return
    has = torch.tensor([t is not None for t in tensors], dtype=torch.int32)
    dist.all_reduce(has, group=_control)
    uneven = ((has > 0) & (has < world.size)).nonzero().flatten().tolist()
    if uneven:
        raise RunFailed(f"parameters {uneven[:5]} (by position in the optimiser) have a gradient on some processes "
                        f"and not on others; a method trained by several processes must use every parameter on each")
    _flat_collective([t for t in tensors if t is not None], lambda flat: (dist.all_reduce(flat), flat.div_(world.size)))


def _flat_collective(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """``collective`` (in place) on ``tensors``, in one call per dtype on their concatenation, in a fixed order; the
    result copied back (bool tensors travel as bytes)."""
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat.view(torch.uint8) if dtype == torch.bool else flat)
        for tensor, chunk in zip(group, flat.split([t.numel() for t in group])):
            tensor.copy_(chunk.view_as(tensor))


def gathered(values: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``values`` (the same shape on each), stacked in rank order along a new first dimension."""
    if world.size == 1:
        return values.unsqueeze(0)
    parts = [torch.empty_like(values) for _ in range(world.size)]
    dist.all_gather(parts, values.contiguous())
    return torch.stack(parts)


def summed(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over the ranks (a copy; the input is left as it was)."""
    values = values.clone()
    if world.size > 1:
        dist.all_reduce(values)
    return values


def fit_once(method, fit: Callable[[], None]) -> None:
    """A method's offline fit (``fit``, which calls ``Method.prepare``) in a run across processes: rank 0 fits
    alone, as one process (the method's ``world`` is one process meanwhile, so its own collectives are skipped),
    while the others wait on the announcements' group, whose long timeout allows a long fit; then every tensor of
    the method's state goes from rank 0 to the others (as a resumed run loads it from its checkpoint), and their
    load hooks run. A RunFailed on rank 0 ends the run on every process. In one process: ``fit()``."""
    world = method.world
    if world.size == 1:
        return fit()
    failure = [None]
    if world.main:
        method.world = World()
        try:
            fit()
        except Exception as error:
            failure[0] = f"{type(error).__name__} on process 0 while fitting: {error}"
            raise
        finally:
            method.world = world
            dist.broadcast_object_list(failure, src=0, group=_control)
    else:
        dist.broadcast_object_list(failure, src=0, group=_control)
        if failure[0] is not None:
            raise RunFailed(failure[0])
    state = method.state_dict()
    _flat_collective([t for t in state.values() if isinstance(t, torch.Tensor)], lambda flat: dist.broadcast(flat, 0))
    if not world.main:
        method.load_state_dict(state)


def broadcast_buffers(module: nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) to every rank, before an evaluation."""
    if world.size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are over the whole global batch, through a differentiable all-reduce
    (torch's functional collectives) of each channel's count, sum and sum of squares, for devices where torch's
    SyncBatchNorm has no kernels (CPUs under gloo). Evaluation, and training in one process, are BatchNorm's."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed._functional_collectives import all_reduce  # its backward all-reduces the gradient

        def total(t: torch.Tensor) -> torch.Tensor:
            return all_reduce(t, "sum", dist.group.WORLD)

        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        x32 = x.float()  # statistics in fp32 under autocast too, as BatchNorm keeps them
        sums = total(torch.cat([x32.sum(dims), x32.new_tensor([x.numel() // channels])]))
        count = sums[-1]
        mean = sums[:channels] / count
        var = total(((x32 - mean.view(shape)) ** 2).sum(dims)) / count  # two passes: no cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var.detach() * count / (count - 1)).to(self.running_var.dtype), momentum)
        y = (x32 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
        return y.to(x.dtype)


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm synchronised across the ranks: torch's SyncBatchNorm on CUDA, else
    SyncBatchNormCPU, weights and running statistics carried over."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNormCPU):
            synced = SyncBatchNormCPU(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced.to(next(child.buffers(), torch.empty(0)).device))
        else:
            sync_batch_norm(child, device)
    return module
