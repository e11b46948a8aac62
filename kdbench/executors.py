"""Executors: where the runs of a plan execute. ``local`` is kdbench.harness.run_sweep, in this process; ``ray``
spreads the runs over a Ray cluster.

Under Ray every run is one task that calls kdbench.harness.run in a worker, so a run is the same code either way.
A task takes the results of the runs that teach it as arguments, so Ray starts it only when they are done:
teachers, then teacher-assistant chains, then students, as many at once as the cluster has GPUs (or CPU slots).
Workers write straight into the results dir, which must therefore be one filesystem that every node sees (NFS,
Lustre, a local disk for a one-node cluster). A worker that dies is replaced and its task retried; the run resumes
from its last epoch checkpoint, and its claim (a flock the kernel dropped with the dead process) keeps each result
made once.

With ``--runs-per-gpu K`` a CUDA run takes 1/K of a GPU (or more, where its measured peak memory allows fewer to
share: kdbench.packing), so Ray starts K runs on each; the local executor then runs the sweep on a Ray cluster of
this machine.

A run trained by several processes (``--gpus-per-run N``) is a Ray Train ``TorchTrainer`` of N workers, which sets
up their process group (NCCL on GPUs, gloo on CPUs) across the cluster's nodes; its rank 0 runs the harness as a
one-process run does and the others follow it (kdbench.distributed). Runs are scheduled as above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from kdbench.errors import KdbenchError, RunFailed
from kdbench.harness import RunEnv, load_data, run, run_sweep
from kdbench.progress import log
from kdbench.results import RunRecord
from kdbench.reuse import failed_record, remakes_announced
from kdbench.spec import RunSpec

EXECUTORS = ("local", "ray")
RETRIES = 3  # times Ray restarts a task whose worker died (out of memory, a killed node, kill -9)


@dataclass(frozen=True)
class RayOptions:
    """Resources of one run: a GPU per CUDA run; ``cpus`` threads each (the CPU slots of a CPU-only cluster)."""

    address: str | None = None  # None: start a local cluster; "auto" or "ray://host:10001": attach to one
    cpus: int = 1
    # GPUs a run takes, over the runs sharing its GPU (kdbench.packing: 1/k); None: 1 for CUDA runs, 0 for CPU runs
    gpus: float | None = None


def execute(specs: list[RunSpec], env: RunEnv, executor: str = "local", ray_options: RayOptions | None = None,
            shares: dict[str, int] | None = None) -> list[RunRecord]:
    """``shares``: run id -> runs sharing its GPU (kdbench.packing); runs that share one run under Ray, on this
    machine's own cluster with the local executor."""
    if executor == "local" and not any(k > 1 for k in (shares or {}).values()):
        return run_sweep(specs, env)
    if executor in ("local", "ray"):
        return run_sweep_ray(specs, env, ray_options or RayOptions(), shares or {})
    raise KdbenchError(f"unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}")


def _run_task(spec_dict: dict, env: RunEnv, threads: int, remake: bool, *trainers: dict) -> dict:
    """One run in a Ray worker; ``remake``: as harness.run's; ``trainers``: the records of the runs that teach it
    (Ray waited for them)."""
    import torch

    if not log.handlers:  # the worker's lines reach the driver through Ray's log forwarding
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("kdbench: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    torch.set_num_threads(threads)
    return run(RunSpec.from_dict(spec_dict), env, _failed_trainer(trainers), remake=remake).to_dict()


def _failed_trainer(trainers: tuple[dict, ...]) -> str | None:
    """The run id of the first of a run's trainers (records Ray waited for) that did not finish."""
    return next((t["run_id"] for t in trainers if t["status"] != "finished"), None)


def record_failed_run(env: RunEnv, spec_dict: dict, reason: str) -> str | None:
    """Records as failed, with ``reason``, a run whose process group stopped because one of its processes raised
    (kdbench.distributed.launch), keeping the epochs it completed; its run id, or None, recording nothing, if it had
    finished."""
    spec = RunSpec.from_dict(spec_dict)
    if env.store.finished_record(spec.run_id, repair=False) is not None:
        return None
    env.store.write_record(failed_record(spec, RunFailed(reason), env.store))
    env.store.rebuild_table()
    return spec.run_id


def follow_group(env: RunEnv) -> None:
    """A process of rank > 0 of runs trained by several (torchrun, --gpus-per-run, Ray Train): trains what rank 0
    announces, writing nothing (FollowerStore) and showing no progress of its own."""
    from kdbench.harness import follow
    from kdbench.results import FollowerStore

    follow(replace(env, store=FollowerStore(env.store.root), sinks=(), progress=False))


def _group_worker(config: dict) -> None:
    """One of the N Ray Train workers of a run trained by several processes: rank 0 trains and records it, the
    others train with it."""
    import torch

    from kdbench.distributed import announce, join

    env: RunEnv = config["env"]
    spec = RunSpec.from_dict(config["spec"])
    torch.set_num_threads(config["threads"])
    if join(torch.device(spec.device)).main:
        try:
            run(spec, env, config["failed"], remake=config["remake"])
        finally:
            announce(None)
    else:
        follow_group(env)


def _run_group_task(spec_dict: dict, env: RunEnv, threads: int, remake: bool, *trainers: dict) -> dict:
    """A run trained by ``spec.world_size`` processes: a TorchTrainer of that many workers, each with ``threads``
    CPUs and, for CUDA runs, a GPU; the record is the one its rank 0 wrote."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = RunSpec.from_dict(spec_dict)
    cuda = spec.device == "cuda"
    trainer = TorchTrainer(_group_worker, train_loop_config={"spec": spec_dict, "env": env, "threads": threads,
                                                             "failed": _failed_trainer(trainers), "remake": remake},
                           scaling_config=ScalingConfig(num_workers=spec.world_size, use_gpu=cuda,
                                                        resources_per_worker={"CPU": threads, **({"GPU": 1} if cuda
                                                                                                 else {})}),
                           run_config=RunConfig(name=spec.run_id))
    error: Exception | None = None
    try:
        trainer.fit()
    except Exception as failure:  # a worker raised (Ray re-raises it here) or died
        if isinstance(failure.__cause__, KdbenchError):
            raise failure.__cause__ from None
        error = failure
    record = env.store.load_record(spec.run_id)
    if error is not None or record is None or record.status == "running":
        record = failed_record(spec, error or RunFailed("its rank 0 wrote no record"), env.store)
        env.store.write_record(record)
    return record.to_dict()


def run_sweep_ray(specs: list[RunSpec], env: RunEnv, options: RayOptions,
                  shares: dict[str, int] | None = None) -> list[RunRecord]:
    """Submits the plan as a graph of Ray tasks, then reports each run as it ends and rebuilds the table.
    ``shares``: run id -> runs sharing its GPU (kdbench.packing): a CUDA run then takes 1/k of one."""
    shares = shares or {}
    try:
        import ray
    except ImportError:
        raise KdbenchError("--executor ray needs Ray: pip install 'kdbench[ray]'") from None
    load_data(specs, env)  # here, before a cluster starts; workers then read it from their own data dir
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=True)
    task, group_task = ray.remote(_run_task), ray.remote(_run_group_task)
    remake = remakes_announced(specs, env)
    refs: dict[str, ray.ObjectRef] = {}
    for spec in specs:
        shared_by = shares.get(spec.run_id, 1)
        gpus = (options.gpus if options.gpus is not None else float(spec.device == "cuda")) / shared_by
        trainers = [refs[t] for t in (spec.teacher_run, *spec.assistant_runs) if t in refs]
        # a group's task only waits for its TorchTrainer, whose workers hold the resources
        remote, cpus, gpus = ((group_task, 0, 0) if (spec.world_size or 1) > 1 else (task, options.cpus, gpus))
        refs[spec.run_id] = remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=False,
                                           name=spec.run_id).remote(
            spec.to_dict(), replace(env, shared_by=shared_by), options.cpus, spec.run_id in remake, *trainers)
    by_ref = {ref: spec for spec, ref in zip(specs, refs.values())}
    records: dict[str, RunRecord] = {}
    pending = list(refs.values())
    while pending:
        (done,), pending = ray.wait(pending, num_returns=1)
        spec = by_ref[done]
        try:
            record = RunRecord.from_dict(ray.get(done))
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.TaskCancelledError) as error:
            if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, KdbenchError):
                raise error.cause from None
            trainer = next((t for t in (spec.teacher_run, *spec.assistant_runs)
                            if t in records and records[t].status != "finished"), None)
            if trainer:  # Ray failed it with its trainer's error, without running it: say which run failed
                record = run(spec, env, trainer)
            elif isinstance(error, ray.exceptions.RayTaskError):
                raise
            else:  # retries spent
                tries = RETRIES + 1
                record = RunRecord(spec, "failed", {}, [], {},
                                   f"{type(error).__name__}: worker died {tries} time{'s' if tries > 1 else ''}")
                env.store.write_record(record)
        records[spec.run_id] = record
        env.store.rebuild_table()
        log.info("[%d/%d] %s %s", len(records), len(specs), spec.run_id, record.status)
    return [records[spec.run_id] for spec in specs]
