"""The harness: ``run(spec, env) -> RunRecord``, one unit of work, and ``run_sweep`` over many in this process.

A run trains ``spec.student`` with ``spec.method`` (teachers are runs too: role "teacher", method
"student"), evaluates every epoch, checkpoints every epoch for resume, and measures throughput,
memory and wall time. Failures inside a run become failed records; the sweep goes on. A run is trained only
while its claim (a lock in the results dir) is held, so processes that share a results dir never train one run
twice; other executors (kdbench.executors) call the same ``run``.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdbench import distributed
from kdbench.compiled import compile_forward
from kdbench.data import ArrayData, load_dataset
from kdbench.distributed import (
    World,
    announce,
    broadcast_buffers,
    fit_once,
    group_provenance,
    seed_process,
    summed,
    sync_batch_norm,
)
from kdbench.errors import KdbenchError, RunFailed
from kdbench.execution import autocast, batch_statistics, evaluate, load_weights
from kdbench.fingerprint import fingerprint
from kdbench.loader import DeviceLoader, input_shape, run_loader, stream_seed
from kdbench.measure import StepTimer, macs_per_image, peak_bytes, provenance, reset_peak_memory, run_metrics
from kdbench.methods import method_class
from kdbench.methods.base import MethodContext, Preparation, StepOutputs
from kdbench.models import create_model, model_entry
from kdbench.models.taps import FeatureExtractor, feature_shapes
from kdbench.parts import Parts
from kdbench.progress import RunLog, SinkChoice, SweepProgress, log
from kdbench.results import ResultsStore, RunRecord, sha256_file
from kdbench.reuse import NON_FINITE, diverged_before, failed_record, kept_record, remakes_announced
from kdbench.spec import RunSpec


@dataclass(frozen=True)
class RunEnv:
    """Where a run reads and writes; not part of the spec, so it does not change run ids."""

    store: ResultsStore
    data_dir: Path | None = None
    download: bool = True
    checkpoints: dict[str, Path] = field(default_factory=dict)  # sha256 -> teacher checkpoint file
    progress: bool | None = None  # None: progress bars only on an interactive terminal
    reuse_stale: bool = False  # keep finished runs made by other code (--reuse-stale) instead of re-running them
    retry_failed: bool = False  # train again runs that diverged under the current code (--retry-failed)
    sinks: tuple[SinkChoice, ...] = ()  # metric sinks of every run (kdbench.progress.SinkChoice)
    # runs that may share this run's device at once (--runs-per-gpu, kdbench.packing): recorded, since a shared
    # device's throughput is not a dedicated one's; the numbers a run computes do not depend on it
    shared_by: int = 1


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: Path | None, download: bool) -> ArrayData:
    return load_dataset(name, data_dir, download)


def _frozen(arch: str, run_id: str, env: RunEnv, data: ArrayData,
            device: torch.device) -> tuple[torch.nn.Module, RunRecord]:
    """A finished run's model (teacher or teacher assistant) in eval mode, without gradients."""
    record = env.store.finished_record(run_id)
    if record is None:
        raise RunFailed(f"run {run_id} that teaches this one has not finished")
    if not env.store.weights_path(run_id).is_file():  # a sweep makes it again first (weights_to_remake)
        raise RunFailed(f"run {run_id} that teaches this one has no weights (its model.pt is missing)")
    model = create_model(arch, data.info.num_classes, data.info.in_channels)
    load_weights(model, env.store.weights_path(run_id), "trainer weights")
    model.to(device).eval().requires_grad_(False)
    return model, record


def _import_pretrained(spec: RunSpec, env: RunEnv, loader: DeviceLoader, device: torch.device) -> RunRecord:
    """A teacher run that evaluates a given checkpoint instead of training."""
    path = env.checkpoints.get(spec.pretrained)
    if path is None:
        raise KdbenchError(f"no checkpoint file with sha256 {spec.pretrained} was given (--teacher-ckpt)")
    info = loader.info
    model = create_model(spec.student, info.num_classes, info.in_channels)
    load_weights(model, Path(path), "teacher checkpoint")
    env.store.write_spec(spec)
    env.store.save_torch(env.store.weights_path(spec.run_id), model.state_dict())
    scores = _scores(model.to(device), loader, spec, device)
    metrics = {"top1_last": scores["top1"], "top5_last": scores["top5"], "top1_best": scores["top1"],
               **({"top1_at_best_val": scores["top1"], "val_top1_best": scores["val_top1"]} if "val_top1" in scores
                  else {}),
               "student_params": float(sum(p.numel() for p in model.parameters())), "wall_s": 0.0,
               "eval_images_per_s": scores["eval_images_per_s"]}
    prov = {**provenance(device), **fingerprint(spec), "checkpoint_sha256": spec.pretrained,
            "checkpoint_path": str(path), "weights_sha256": sha256_file(env.store.weights_path(spec.run_id))}
    record = RunRecord(spec, "finished", metrics, [], prov)
    env.store.write_record(record)
    return record


def _scores(model: torch.nn.Module, loader: DeviceLoader, spec: RunSpec, device: torch.device) -> dict[str, float]:
    """An epoch's evaluation: test top-1/top-5, the validation split's top-1/top-5 where the recipe holds one out,
    the time both took (``eval_s``) and the test set's evaluation throughput. Every process evaluates the whole
    test set with rank 0's running statistics."""
    broadcast_buffers(model, World.current())
    test = evaluate(model, loader, spec, device)
    scores = {"top1": test["top1"], "top5": test["top5"], "eval_s": test["eval_s"],
              "eval_images_per_s": test["eval_images_per_s"]}
    if loader.has_validation:
        val = evaluate(model, loader, spec, device, "val")
        scores.update(val_top1=val["top1"], val_top5=val["top5"], eval_s=test["eval_s"] + val["eval_s"])
    return scores


def _assemble(spec: RunSpec, env: RunEnv, data: ArrayData, device: torch.device, frozen=_frozen) -> Parts:
    """Student (seeded init), frozen teacher, method modules built from feature shapes, one SGD for all. ``frozen``
    makes each trainer from (arch, run id, env, data, device): by default the finished run's weights (a dry run
    passes untrained models)."""
    info, recipe = data.info, spec.recipe
    method_cls = method_class(spec.method)
    shape = input_shape(data, recipe.image_size)
    torch.manual_seed(stream_seed(spec.seed, 0, "init"))
    student = create_model(spec.student, info.num_classes, info.in_channels).to(device)
    lineage = list(zip((spec.teacher, *spec.assistants), (spec.teacher_run, *spec.assistant_runs)))
    trainers, records = (zip(*(frozen(arch, run_id, env, data, device) for arch, run_id in lineage))
                         if method_cls.needs_teacher else ((), ()))
    ctx = MethodContext.of_run(spec, info.num_classes, feature_shapes(student, shape),
                               feature_shapes(trainers[0], shape) if trainers else None,
                               spec.recipe.train_images(len(data.train_y)))
    method = method_cls(ctx).to(device)
    if spec.sync_bn:  # the student's BatchNorms and the method's own (FitNet's regressor)
        student, method = sync_batch_norm(student, device), sync_batch_norm(method, device)
    method.attach(student)
    memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
    for module in (student, method, *trainers):
        module.to(memory_format=memory_format)
    for module in (student, *trainers):
        compile_forward(module, spec.compile)
    base_lr = recipe.lr if recipe.lr is not None else model_entry(spec.student).base_lr
    # fused SGD on CUDA, foreach elsewhere: the same update rule either way
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=base_lr,
                                momentum=recipe.momentum, nesterov=recipe.nesterov,
                                weight_decay=recipe.weight_decay, **fused)
    stage = method.init_stage(student, base_lr)
    init_optimizer = torch.optim.SGD(stage.parameters, lr=stage.lr, momentum=recipe.momentum,
                                     weight_decay=recipe.weight_decay, **fused) if stage else None
    return Parts(student, method, optimizer, base_lr, FeatureExtractor(student, method.student_taps),
                  list(trainers), [FeatureExtractor(t, method.teacher_taps) for t in trainers], list(records),
                  stage, init_optimizer)


def _preparation(parts: Parts, loader: DeviceLoader, spec: RunSpec, store: ResultsStore) -> Preparation:
    teacher_fx = parts.trainer_fx[0]

    @torch.no_grad()
    def teacher(x: torch.Tensor):
        with autocast(spec, loader.device):
            return teacher_fx(x)

    # A stream of its own, so preparing changes nothing in the training stream.
    return Preparation(teacher, lambda n: loader.train_epoch(stream_seed(spec.seed, n, "prepare"), n),
                       loader.train_plain,
                       store.run_dir(spec.teacher_run) / "artefacts", loader.device, spec.recipe.fit_points,
                       loader.train_y[loader.subset], parts.trainers[0])


def _view_logits(parts: Parts, active: tuple[int, ...], images: torch.Tensor):
    """(student logits, teacher logits or None) on another view of the batch, forwarded apart: the student's
    BatchNorm sees each view's statistics, as MLKD's code forwards them."""
    teacher = [parts.trainers[0]] if 0 in active else []
    with torch.no_grad(), batch_statistics(teacher, parts.method.teacher_batch_stats):
        teacher_logits = parts.trainer_fx[0](images)[0] if teacher else None
    return parts.student_fx(images)[0], teacher_logits


def _train_epoch(parts: Parts, loader: DeviceLoader, spec: RunSpec, epoch: int, timer: StepTimer,
                 show: bool | None, stage: str = "main") -> dict[str, float]:
    """One epoch of steps of ``stage`` ("init": the method's InitStage, with its optimiser); loss terms and correct
    counts stay on the device until the epoch ends."""
    optimizer = parts.optimizer_of(stage)
    device = loader.device
    precision = autocast(spec, device)
    seed_process(spec.seed, epoch, parts.method.world)
    parts.student.train(stage == "main")  # an init stage trains only its own student modules (InitStage)
    for module in parts.init_stage.student_train_modules if stage == "init" else ():
        module.train()
    parts.method.train()
    for trainer in parts.trainers:
        assert not trainer.training and not any(p.requires_grad for p in trainer.parameters())
    sums: dict[str, torch.Tensor] = {}
    frozen_forwards = 0
    correct = torch.zeros((), device=device, dtype=torch.long)
    started_epoch, started_cpu = time.perf_counter(), time.process_time()
    views = parts.method.views
    batches = tqdm(loader.train_epoch(spec.seed, epoch, positions=True, views=views), total=loader.steps_per_epoch,
                   unit="step", leave=False, disable=None if show is None else not show, desc=f"epoch {epoch + 1}")
    for step, (x, y, positions, *viewed) in enumerate(batches):
        started = timer.start()
        active = parts.method.trainers_for_step(epoch, step) if parts.trainers else ()
        frozen_forwards += len(active) + len(views) * (0 in active)
        with precision:
            s_logits, s_features = parts.student_fx(x)
            with torch.no_grad(), batch_statistics([parts.trainers[i] for i in active],
                                                   parts.method.teacher_batch_stats):
                taught = {i: parts.trainer_fx[i](x) for i in active}
            teacher_logits, teacher_features = taught.pop(0, (None, None))
            extra = {name: _view_logits(parts, active, images) for name, images in (viewed[0] if views else {}).items()}
            terms = parts.method.losses(StepOutputs(y, s_logits, s_features, teacher_logits, teacher_features,
                                                    {i: logits for i, (logits, _) in taught.items()}, epoch,
                                                    positions, stage, extra))
        parts.method.step(optimizer, terms)
        timer.stop(started, len(y) * parts.method.world.size)  # the global batch: all processes step together
        if timer.steps_seen == spec.recipe.warmup_steps:  # measure memory after warm-up
            reset_peak_memory(device)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        correct += (s_logits.argmax(dim=1) == y).sum()
    train_s = time.perf_counter() - started_epoch
    steps, world = loader.steps_per_epoch, parts.method.world
    peak = torch.tensor(peak_bytes(device), device=device)  # summed over the processes of a run trained by several
    *sums_all, correct, peaks = summed(torch.stack([*sums.values(), correct.float(), peak]), world).tolist()
    losses = {f"loss_{name}": value / steps / world.size for name, value in zip(sums, sums_all)}
    return {"train_top1": 100.0 * correct / (steps * loader.batch_size if loader.drop_last
                                                    else loader.num_train),
            "loss": sum(losses.values()), **losses, "epoch_s": train_s,
            "epoch_cpu_s": time.process_time() - started_cpu, "frozen_forwards_per_step": frozen_forwards / steps,
            **({"peak_bytes_all_processes": peaks} if world.size > 1 else {})}


def _remade(spec: RunSpec, old: RunRecord, env: RunEnv, runlog: RunLog) -> RunRecord:
    """Trains a kept run without weights again for the runs that need them, its old record set aside, and says
    whether the new weights are the old ones bit for bit (training is deterministic per machine and torch build)."""
    store = env.store
    store.set_aside(store.run_dir(spec.run_id) / "record.json", "", say=False, why="remade")
    log.info("%s finished before but has no weights, which runs of this sweep need: made again", spec.run_id)
    record = _train(spec, env, runlog)
    before, after = old.provenance.get("weights_sha256"), record.provenance["weights_sha256"]
    record.provenance["remade_from_weights_sha256"] = before
    store.write_record(record)
    # warnings both: the CLI shows only warnings on a terminal
    if before == after:
        log.warning("%s: its re-made weights are bit-identical to the recorded ones (sha256 %s…)", spec.run_id,
                    after[:12])
    else:
        log.warning("%s: its re-made weights differ from the recorded ones (sha256 %s…, was %s…): another machine "
                    "or torch build, or saved before kdbench saved weights reproducibly; runs taught by the old "
                    "weights and by the new are not bit-comparable",
                    spec.run_id, after[:12], (before or "not recorded")[:12])
    return record


def _train(spec: RunSpec, env: RunEnv, runlog: RunLog, remake: bool = False, decided: bool = False) -> RunRecord:
    """Trains (or resumes) one run, its claim held. A finished run is returned as stored when the current code made
    it (or ``env.reuse_stale``), unless ``remake`` asks for its missing weights; else it is trained again, as is a
    resume state left by other code. ``decided``: rank 0 of the run's processes decided to train it (``follow``)."""
    store = env.store
    code = fingerprint(spec)
    existing = None if decided else kept_record(spec, env)
    if existing is not None:
        if remake and not store.weights_path(spec.run_id).is_file():  # another process may have re-made them
            return _remade(spec, existing, env, runlog)
        runlog.end("skipped", "finished before")
        return existing
    failed = None if decided else diverged_before(spec, env)
    if failed is not None:
        runlog.end("skipped", "diverged before under this code (a non-finite loss); --retry-failed trains it again")
        return failed
    announce(spec)  # a run trained by several processes: the others train it now too (kdbench.distributed)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = _dataset(spec.dataset, env.data_dir, env.download)
    recipe = spec.recipe
    loader = run_loader(spec, data, device, method_class(spec.method).needs_full_batches, World.current())
    if spec.pretrained:
        record = _import_pretrained(spec, env, loader, device)
        runlog.end("finished", f"imported checkpoint, top1 {record.metrics['top1_last']:.2f}")
        return record
    store.write_spec(spec)
    parts = _assemble(spec, env, data, device)
    parts.method.world = World.current()  # a dry run's or a profile's parts stay in one process
    teacher = parts.trainers[0] if parts.trainers else None

    history: list[dict[str, float]] = []
    step_times: list[tuple[float, int]] = []
    prepare_s = reused_fit_s = 0.0
    fit_metrics: dict[str, float] = {}
    checkpoint_path = store.checkpoint_path(spec.run_id)
    state = store.load_torch(checkpoint_path, "resume checkpoint", map_location=device, weights_only=True)
    if state is not None and state.get("code_fingerprint") == code["code_fingerprint"]:
        # resume: modules, optimiser, history, RNG (data streams are pure functions)
        parts.load_state(state)
        history, step_times = state["history"], [tuple(t) for t in state["step_times"]]
        prepare_s, reused_fit_s, fit_metrics = state["prepare_s"], state["reused_fit_s"], state["fit_metrics"]
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)

    if not history:  # new weights: what earlier weights of this run had fitted for its students is void
        store.discard(store.run_dir(spec.run_id) / "artefacts")
    teacher_scores = evaluate(teacher, loader, spec, device) if teacher is not None else None
    if not history and teacher is not None:  # a resumed run restored what prepare fitted
        started = time.perf_counter()
        fit_once(parts.method, lambda: parts.method.prepare(_preparation(parts, loader.whole(), spec, store)))
        prepare_s = time.perf_counter() - started
        reused_fit_s, fit_metrics = parts.method.reused_fit_s(), parts.method.fit_metrics()
    trainer_states = [{k: v.clone() for k, v in t.state_dict().items()} for t in parts.trainers]
    prov = {**group_provenance(provenance(device)), **code, "method_note": parts.method.note,
            "method_label": type(parts.method).label(dict(spec.method_options)), "device_shared_by": env.shared_by}
    if teacher is not None:
        prov["teacher_weights_sha256"] = sha256_file(store.weights_path(spec.teacher_run))
        prov["teacher_recipe"] = parts.trainer_records[0].spec.recipe.name
        prov["teacher_seed"] = parts.trainer_records[0].spec.seed  # a row's teacher is part of its identity
    reset_peak_memory(device)
    timer = StepTimer(device, recipe.warmup_steps)
    show = env.progress
    runlog.start(len(history), parts.init_epochs)
    images_per_epoch = loader.steps_per_epoch * recipe.batch_size if loader.drop_last else loader.num_train
    init = parts.init_epochs
    # One epoch axis: init-stage epochs are −init .. −1 (recorded as 1 − init .. 0), main ones 0 .. E − 1, so main
    # epoch k is epoch k for every method and no init epoch replays a main epoch's data stream.
    for index in tqdm(range(len(history), init + recipe.epochs), desc=spec.run_id, initial=len(history),
                      total=init + recipe.epochs, unit="epoch", leave=False,
                      disable=None if show is None else not show):
        epoch = index - init
        stage = "init" if epoch < 0 else "main"
        if stage == "init":
            lr = parts.init_stage.lr
        else:
            lr = recipe.lr_at(epoch, parts.base_lr)
            if epoch == 0 and init:  # the main stage's warm-up and memory peak are its own, resumed or not
                timer = StepTimer(device, recipe.warmup_steps)
                reset_peak_memory(device)
            for module in parts.init_stage.frozen_after if parts.init_stage else ():
                module.requires_grad_(False)
        for group in parts.optimizer_of(stage).param_groups:
            group["lr"] = lr
        train = _train_epoch(parts, loader, spec, epoch, timer, show, stage)
        if not math.isfinite(train["loss"]):
            raise RunFailed(f"{NON_FINITE} ({train['loss']}) in {stage} epoch {epoch + 1}")
        steps = timer.flush()
        step_times += steps if stage == "main" else []  # throughput is the main stage's; wall time counts all
        evaluates = recipe.evaluates(index, init) if stage == "init" else recipe.evaluates(epoch)
        scores = _scores(parts.student, loader, spec, device) if evaluates else {"eval_s": 0.0}
        history.append({"epoch": epoch + 1, **scores, **train, "lr": lr})
        runlog.epoch(history[-1], images_per_epoch)
        store.save_torch(checkpoint_path, {
            **parts.state(), "history": history, "step_times": step_times, "prepare_s": prepare_s,
            "reused_fit_s": reused_fit_s, "fit_metrics": fit_metrics, "code_fingerprint": code["code_fingerprint"],
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
        store.write_record(RunRecord(spec, "running", {}, history, prov))

    if decided:  # another process of the run's group: rank 0 measures, saves and records it
        return RunRecord(spec, "running", {}, history, prov)
    for extractor in (parts.student_fx, *parts.trainer_fx):
        extractor.remove()
    shape = input_shape(data, recipe.image_size)
    plain = create_model(spec.student, data.info.num_classes, data.info.in_channels).to(device)
    deployed = parts.method.export(parts.student)
    for trainer, before in zip(parts.trainers, trainer_states):
        changed = [k for k, v in trainer.state_dict().items() if not torch.equal(v, before[k])]
        if changed:  # parameters or BN statistics: a frozen trainer must come out as it went in
            raise RunFailed(f"a frozen teacher changed during training ({', '.join(changed[:3])})")
    store.save_torch(store.weights_path(spec.run_id), deployed.state_dict())
    prov["weights_sha256"] = sha256_file(store.weights_path(spec.run_id))
    metrics = {**run_metrics(history, step_times, device, parts.method.world.size), **fit_metrics}
    metrics.update(
        student_params=float(sum(p.numel() for p in parts.student.parameters())),
        extra_params_train=float(parts.method.extra_params_train()),
        extra_params_inference=float(parts.method.extra_params_inference()),
        inference_params=float(sum(p.numel() for p in deployed.parameters())),
        # the plain architecture, and the deployed student with whatever the method left in it
        student_macs=macs_per_image(plain, shape), inference_macs=macs_per_image(deployed, shape),
        train_images=float(loader.num_train),
        test_images=float(loader.test_y.shape[0]),
        iters_per_epoch=float(loader.steps_per_epoch),
        dropped_images_per_epoch=float(loader.num_train - loader.steps_per_epoch * recipe.batch_size
                                       if loader.drop_last else 0),
    )
    if teacher is not None:
        # End-to-end cost: the teacher's and every assistant's training are part of what this result took.
        teacher_wall, *assistant_walls = (r.metrics.get("wall_s", 0.0) for r in parts.trainer_records)
        metrics.update(teacher_top1=teacher_scores["top1"], teacher_top5=teacher_scores["top5"],
                       teacher_wall_s=teacher_wall, assistant_trainings=float(len(assistant_walls)),
                       assistant_wall_s=sum(assistant_walls), prepare_s=prepare_s, reused_fit_s=reused_fit_s,
                       end_to_end_wall_s=metrics["wall_s"] + prepare_s + reused_fit_s + teacher_wall
                       + sum(assistant_walls))
    record = RunRecord(spec, "finished", metrics, history, prov)
    store.write_record(record)
    store.discard(checkpoint_path)
    runlog.end("finished", f"top1 {metrics['top1_last']:.2f}, {metrics['wall_s']:.0f} s")
    return record


def run(spec: RunSpec, env: RunEnv, trainer_failed: str | None = None, sweep: SweepProgress | None = None,
        wait: bool = True, remake: bool = False) -> RunRecord | None:
    """One run of a sweep under its claim; a failure inside it (NaN, out of memory, a bug in one method) becomes a
    failed record, written, and the caller goes on. ``trainer_failed``: the run id of a failed run that teaches this
    one; ``remake``: a kept run without weights is trained again (``weights_to_remake``). Returns None, at once, when
    another process holds the run and ``wait`` is False. User errors (KdbenchError) propagate: they stop the
    sweep."""
    with env.store.claim(spec.run_id, wait) as claimed:
        if not claimed:
            return None
        runlog = RunLog(spec, env.store.root, sweep, env.sinks)
        try:
            if trainer_failed:
                raise RunFailed(f"run {trainer_failed} that teaches this one failed")
            return _train(spec, env, runlog, remake)
        except (KdbenchError, KeyboardInterrupt):
            raise
        except Exception as error:
            if World.current().size > 1 and not isinstance(error, RunFailed):
                raise  # on one process only, maybe: the group stops (kdbench.distributed)
            record = failed_record(spec, error, env.store)
            env.store.write_record(record)
            runlog.end("failed", record.error)
            if spec.device == "cuda":
                torch.cuda.empty_cache()
            return record


def follow(env: RunEnv) -> None:
    """A process of rank > 0 of runs trained by several: trains each run that rank 0 announces, until its sweep
    ends (kdbench.distributed); ``env.store`` writes nothing (FollowerStore)."""
    distributed.follow(lambda spec: _train(spec, env, RunLog(spec, env.store.root), decided=True))


def load_data(specs: list[RunSpec], env: RunEnv) -> None:
    """Loads every dataset of a plan, so that a data problem stops the sweep before anything is written."""
    for dataset in {spec.dataset for spec in specs}:
        _dataset(dataset, env.data_dir, env.download)


def run_sweep(specs: list[RunSpec], env: RunEnv) -> list[RunRecord]:
    """Runs every spec in order (teachers first). A run that another process holds is put off, with the runs it
    teaches, and tried again after the others; only when every run left is held is the first one waited for.
    Processes that share a results dir thus split the work, and each run is trained once."""
    load_data(specs, env)
    remake = remakes_announced(specs, env)
    records: dict[str, RunRecord] = {}
    sweep = SweepProgress.of(specs)
    show = env.progress
    bar = tqdm(total=len(specs), desc="sweep", unit="run", disable=None if show is None else not show)

    def attempt(spec: RunSpec, wait: bool) -> bool:
        trainers = (spec.teacher_run, *spec.assistant_runs)
        failed = next((t for t in trainers if t in records and records[t].status != "finished"), None)
        record = run(spec, env, failed, sweep, wait, spec.run_id in remake)
        if record is None:
            log.info("%s is being trained by another process; put off", spec.run_id)
            return False
        records[spec.run_id] = record
        env.store.rebuild_table()
        bar.update()
        return True

    queue = list(specs)
    while queue:
        put_off: list[RunSpec] = []
        for spec in queue:
            held = {p.run_id for p in put_off}
            if any(t in held for t in (spec.teacher_run, *spec.assistant_runs)) or not attempt(spec, wait=False):
                put_off.append(spec)
        if put_off and len(put_off) == len(queue):
            attempt(put_off.pop(0), wait=True)
        queue = put_off
    bar.close()
    return [records[spec.run_id] for spec in specs]
