"""Dry run (``kdbench run ... --dry-run``): the plan and an estimate of its compute, without writing a result.

Each distinct setting of the plan (method and its options, teacher, student, role, device, precision, layout, batch
size) is built once, with untrained trainers of the right architectures in place of the finished runs that will
teach it, and timed on the harness's own code paths (``_train_epoch``, ``evaluate``, the method's ``prepare``) on a
few batches after a warm-up. Every run is then priced by its recipe: its remaining epochs of steps and test
evaluations, the teacher's evaluation, the method's offline fit, and the fixed cost of setting a run up and saving it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from kdbench import harness, reuse
from kdbench.execution import evaluate
from kdbench.fingerprint import fingerprint, stale_reason
from kdbench.loader import DeviceLoader, input_shape, run_loader
from kdbench.measure import StepTimer, macs_per_image, peak_memory, provenance, reset_peak_memory
from kdbench.methods import method_class
from kdbench.models import create_model
from kdbench.progress import rescaled_options
from kdbench.results import DamagedRun, ResultsStore, RunRecord, atomic_write, options_text
from kdbench.spec import RunSpec

WARMUP_STEPS = 3  # untimed steps first: allocator, kernel selection, caches
CACHE_ENV = "KDBENCH_CACHE"  # folder of the price cache (default ~/.cache/kdbench)


@dataclass(frozen=True)
class RunEstimate:
    run_id: str
    role: str
    method: str
    pair: str  # "teacher->student", or the architecture of a run without a teacher
    # train, resume, remake (kept but without weights, which runs to train need), cached, diverged (failed with a
    # non-finite loss under this code: kept failed), stale (finished by other code: trained again), import (a
    # checkpoint)
    status: str
    epochs: int  # epochs left to train
    seconds: float
    note: str = ""  # why: a stale run's changed modules, the runs that need a remade run's weights
    options: str = ""  # the resolved method options, as the results rows record them
    recipe: str = ""  # the recipe's name and epochs after any --epochs, and the options its length rescaled
    peak_bytes: float = 0.0  # its setting's measured peak memory over the timed steps (CUDA max reserved, CPU RSS)
    train_images_per_s: float = 0.0  # its setting's measured training speed (the batch over the median step)


@dataclass(frozen=True)
class Estimate:
    runs: tuple[RunEstimate, ...]
    settings: int  # distinct settings measured
    steps: int  # timed training steps per setting
    devices: tuple[str, ...]
    reused: int = 0  # settings priced from the cache (PriceCache), not measured now

    @property
    def total_s(self) -> float:
        return sum(r.seconds for r in self.runs)


@dataclass(frozen=True)
class _Cost:
    """One setting's measured seconds, per unit of work that a recipe multiplies."""

    step: float
    eval_image: float
    teacher_eval_image: float
    fit_image: float  # prepare per image of the training subset, for a fit and for a run that reuses its cache
    reuse_image: float
    epoch: float  # a checkpoint and a record written every epoch
    run: float  # building the loader and modules, exporting and saving the run
    init_epochs: int = 0  # the method's init stage (AB, FT, FSP)
    init_step: float = 0.0  # a step of that stage, which trains other parameters (FT: the paraphraser alone)
    peak_bytes: float = 0.0  # the device memory training took at its peak (CUDA max reserved, CPU peak RSS)


class _Sample:
    """A DeviceLoader cut to ``batches`` batches a pass (the plain pass to as many images): what the harness's loops
    run on here. ``cycle``: a short epoch runs on into the next; else a pass ends where the real one does (prepare)."""

    def __init__(self, loader: DeviceLoader, batches: int, cycle: bool = True):
        self.loader, self.steps_per_epoch, self.cycle, self.images, self.passes = loader, batches, cycle, 0, 0
        self.num_train, self.drop_last = batches * loader.batch_size, True

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def _take(self, make, batches: int):
        self.passes += 1
        passes = (make(k) for k in (itertools.count() if self.cycle else range(1)))
        for batch in itertools.islice(itertools.chain.from_iterable(passes), batches):
            self.images += len(batch[1])
            yield batch

    def train_epoch(self, seed: int, epoch: int, positions: bool = False, views: tuple[str, ...] = ()):
        return self._take(lambda k: self.loader.train_epoch(seed, epoch + k, positions, views), self.steps_per_epoch)

    def train_plain(self):
        return self._take(lambda k: self.loader.train_plain(), -(-self.num_train // self.loader.eval_batch_size))

    def test_batches(self, split: str = "test"):
        return self._take(lambda k: self.loader.test_batches(split), self.steps_per_epoch)


def _sizes(spec: RunSpec, data) -> tuple[int, int, int]:
    """(training images, steps per epoch, test images) of ``spec``, as ``harness.run``'s loader has them."""
    recipe = spec.recipe
    n = recipe.train_images(len(data.train_y))
    drop = recipe.drop_last or method_class(spec.method).needs_full_batches
    steps = n // recipe.batch_size if drop else -(-n // recipe.batch_size)
    return n, steps, recipe.test_images(len(data.test_y))


def _loader(spec: RunSpec, data, device: torch.device) -> DeviceLoader:
    return run_loader(spec, data, device, method_class(spec.method).needs_full_batches)


def _untrained(arch: str, run_id: str, env: harness.RunEnv, data, device: torch.device):
    """A trainer for ``harness._assemble`` in a dry run: the runs that will teach this one need not exist yet."""
    model = create_model(arch, data.info.num_classes, data.info.in_channels)
    return model.to(device).eval().requires_grad_(False), None


def _timed(fn, device: torch.device) -> float:
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _measure(spec: RunSpec, env: harness.RunEnv, steps: int, eval_batches: int, evals: dict) -> _Cost:
    """Times one setting; what it writes goes to a temporary store, deleted. ``evals``: per-image evaluation seconds of
    plain models already timed (a teacher is evaluated by every run it teaches)."""
    device, data = torch.device(spec.device), harness._dataset(spec.dataset, env.data_dir, env.download)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()  # what earlier settings left in the allocator's cache is not this one's peak
    reset_peak_memory(device)
    started = time.perf_counter()
    loader, parts = _loader(spec, data, device), harness._assemble(spec, env, data, device, frozen=_untrained)
    prov = {**provenance(device), **fingerprint(spec)}
    run_s = time.perf_counter() - started

    def per_image(model, arch: str | None) -> tuple[float, float]:
        """(first batch's seconds beyond the steady state, seconds per image); ``arch``: a plain model's, shared."""
        key = (arch, spec.dataset, spec.device, spec.precision, spec.channels_last)
        if arch and key in evals:
            return evals[key]
        warm, sample = _Sample(loader, 1), _Sample(loader, eval_batches)
        first, steady = (evaluate(model, s, spec, device)["eval_s"] for s in (warm, sample))
        cost = max(0.0, first - warm.images * steady / sample.images), steady / sample.images
        if arch:
            evals[key] = cost
        return cost

    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(tmp)
        fit = reuse = teacher_eval = 0.0
        if parts.trainers:
            first_eval, teacher_eval = per_image(parts.trainers[0], spec.teacher)  # harness.run's teacher_scores
            run_s += first_eval
            # prepare twice: a fit, then what a later run of the same teacher pays (a method that caches its fit)
            samples = [_Sample(loader, steps, cycle=False), _Sample(loader, 1, cycle=False)]
            fit, reuse = (_timed(lambda: parts.method.prepare(harness._preparation(parts, s, spec, store)), device)
                          for s in samples)
            # per image of the training subset: prepare's passes over it, each sampled, are scaled to whole passes
            n_train = _sizes(spec, data)[0]
            fit, reuse = (t * s.passes / s.images if s.images else t / n_train for t, s in zip((fit, reuse), samples))
        init_step = 0.0
        if parts.init_stage:  # timed first, as the harness runs it: before the main stage, on its own optimiser
            for group in parts.init_optimizer.param_groups:
                group["lr"] = parts.init_stage.lr
            _, _, init_step = _timed_stage(parts, loader, spec, steps, "init", -2)
        warm, train, step = _timed_stage(parts, loader, spec, steps, "main", 0)
        first_eval, eval_image = per_image(parts.student, None if parts.trainers else spec.student)
        run_s += max(0.0, warm["epoch_s"] - WARMUP_STEPS * step) + first_eval  # a run's first steps and evaluation
        history = [{"epoch": 1, "top1": 0.0, "top5": 0.0, **train, "lr": parts.base_lr, "eval_s": 0.0}]
        epoch_s = _timed(lambda: (
            store.save_torch(store.checkpoint_path(spec.run_id), {**parts.state(), "history": history,
                                                                  "rng_cpu": torch.get_rng_state()}),
            store.write_record(RunRecord(spec, "running", {}, history, prov))), device)

        def finish():  # what harness.run does after the last epoch
            for extractor in (parts.student_fx, *parts.trainer_fx):
                extractor.remove()
            plain = create_model(spec.student, data.info.num_classes, data.info.in_channels).to(device)
            deployed = parts.method.export(parts.student)
            store.save_torch(store.weights_path(spec.run_id), deployed.state_dict())
            shape = input_shape(data, spec.recipe.image_size)
            macs_per_image(plain, shape), macs_per_image(deployed, shape)
            store.write_record(RunRecord(spec, "finished", {"wall_s": 0.0}, history, prov))

        run_s += _timed(finish, device)
    peak = max(peak_memory(device).values())  # the setting's whole run: its fit, steps and evaluation
    return _Cost(step, eval_image, teacher_eval, fit, reuse, epoch_s, run_s, parts.init_epochs, init_step, peak)


def _timed_stage(parts, loader: DeviceLoader, spec: RunSpec, steps: int, stage: str,
                 epoch: int) -> tuple[dict, dict, float]:
    """``WARMUP_STEPS`` untimed steps of ``stage`` (as epoch ``epoch``), then ``steps`` timed ones (``epoch`` + 1):
    both epochs' metrics and the seconds per step, i.e. the median step (robust to a step that another process
    slowed) plus the loop's own share per step."""
    timer = StepTimer(torch.device(spec.device), 0)
    warm = harness._train_epoch(parts, _Sample(loader, WARMUP_STEPS), spec, epoch, timer, False, stage)
    timer.flush()
    timed = harness._train_epoch(parts, _Sample(loader, steps), spec, epoch + 1, timer, False, stage)
    seconds = [s for s, _ in timer.flush()]
    return warm, timed, statistics.median(seconds) + (timed["epoch_s"] - sum(seconds)) / steps


KEPT = ("cached", "diverged")  # statuses of runs a sweep keeps as they are: nothing to price


def _status(spec: RunSpec, env: harness.RunEnv, needed_by: int) -> tuple[str, int, str]:
    """(status, epochs already done, note) as ``harness.run`` will treat the run; ``needed_by``: the runs to train
    that need its weights when it is kept without them (``reuse.weights_to_remake``). Reads, never repairs: damaged
    files are set aside by the run itself."""
    try:
        record = env.store.load_record(spec.run_id, repair=False)
    except DamagedRun:
        return "train", 0, "unreadable record: set aside when the run starts"
    code = fingerprint(spec)
    if record is not None and record.status == "finished":
        if env.store.weights_problem(record) is not None:
            return "train", 0, "its weights are damaged: set aside when the run starts"
        reason = stale_reason(record, code)
        if reason is not None and not env.reuse_stale:
            return "stale", 0, reason
        return ("remake", 0, f"weights needed by {needed_by} run{'s' * (needed_by > 1)}") if needed_by else \
            ("cached", 0, "")
    if spec.pretrained:
        return "import", 0, ""
    if reuse.diverged_before(spec, env) is not None:
        return "diverged", 0, "diverged under this code (a non-finite loss): kept failed; --retry-failed trains it"
    if (record is not None and record.epochs and env.store.checkpoint_path(spec.run_id).exists()
            and record.provenance.get("code_fingerprint") == code["code_fingerprint"]):
        return "resume", len(record.epochs), ""
    return "train", 0, ""


def _setting(spec: RunSpec) -> tuple:
    return (spec.dataset, spec.method, spec.method_options, spec.teacher, spec.assistants, spec.student, spec.role,
            spec.device, spec.precision, spec.channels_last, spec.compile, spec.recipe.batch_size, spec.recipe.pad_mode,
            spec.recipe.image_size, spec.data_backend)


class PriceCache:
    """Measured costs of settings, kept per setting, machine and code in a JSON file, so that pricing a plan again
    (a sweep that grew, a first line before training) times only what it has not timed. A price is a measurement
    of this machine at one moment: another load on it when it was taken skews it, which the dry run says."""

    def __init__(self, path: Path):
        self.path, self.reused = path, 0
        try:
            self.prices: dict[str, dict] = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measured again
            self.prices = {}

    @classmethod
    def default(cls) -> "PriceCache":
        # v2: prices with peak memory, which older kdbench cannot read
        return cls(Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kdbench") / "prices-v2.json")

    @staticmethod
    def key(spec: RunSpec, steps: int, eval_batches: int, machine: dict) -> str:
        return json.dumps([repr(_setting(spec)), steps, eval_batches, machine, fingerprint(spec)["code_fingerprint"]])

    def get(self, key: str) -> _Cost | None:
        price = self.prices.get(key)
        known = {f.name for f in dataclasses.fields(_Cost)}
        if price is None or not known <= price.keys():  # none, or kept by a kdbench that measured less: again
            return None
        self.reused += 1
        return _Cost(**{k: v for k, v in price.items() if k in known})

    def put(self, key: str, cost: _Cost) -> None:
        self.prices[key] = asdict(cost)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda p: p.write_text(json.dumps(self.prices)))


def _machine(device: str) -> dict:
    known = provenance(torch.device(device))
    return {k: known[k] for k in ("device_name", "cpu_threads", "torch_version", "cuda_version")}


def estimate(specs: list[RunSpec], env: harness.RunEnv, steps: int = 5, eval_batches: int = 1,
             prices: PriceCache | None = None, shared_fits: bool = True) -> Estimate:
    """Classifies every run of the plan and prices those that will train; writes nothing under ``env.store``.
    ``prices``: costs measured before on this machine and code, reused, and where new ones are kept.
    ``shared_fits``: a method's cached offline fit is paid once per teacher, as a sweep pays it; False: every run
    pays the whole fit, as the report charges it (``reused_fit_s``)."""
    remake = reuse.weights_to_remake(specs, env)
    plan = [(spec, *_status(spec, env, remake.get(spec.run_id, 0))) for spec in specs]
    costs: dict[tuple, _Cost] = {}
    evals: dict[tuple, tuple[float, float]] = {}
    machines: dict[str, dict] = {}
    for spec, status, *_ in plan:
        if status not in KEPT and _setting(spec) not in costs:
            if prices is None:
                costs[_setting(spec)] = _measure(spec, env, steps, eval_batches, evals)
                continue
            key = PriceCache.key(spec, steps, eval_batches, machines.setdefault(spec.device, _machine(spec.device)))
            cost = prices.get(key)
            if cost is None:
                cost = _measure(spec, env, steps, eval_batches, evals)
                prices.put(key, cost)
            costs[_setting(spec)] = cost
    fitted: set[tuple] = set()  # (teacher run, method, options): a cached fit is paid once per teacher
    rows = []
    for spec, status, done, note in plan:
        seconds, epochs = 0.0, 0
        if status not in KEPT:
            cost, data = costs[_setting(spec)], harness._dataset(spec.dataset, env.data_dir, env.download)
            init_left = 0 if status == "import" else max(0, cost.init_epochs - done)
            epochs = 0 if status == "import" else cost.init_epochs + spec.recipe.epochs - done
            n_train, n_steps, n_test = _sizes(spec, data)
            seconds = cost.run + n_test * (cost.teacher_eval_image if spec.teacher else 0.0)
            n_eval = n_test + (spec.recipe.val_split or 0)  # an evaluation reads the test set and the split
            main_done = max(0, done - cost.init_epochs)
            evaluations = sum(spec.recipe.evaluates(e, cost.init_epochs) for e in range(
                cost.init_epochs - init_left, cost.init_epochs)) + sum(
                spec.recipe.evaluates(e) for e in range(main_done, spec.recipe.epochs))
            seconds += n_eval * cost.eval_image if status == "import" else \
                evaluations * n_eval * cost.eval_image + epochs * cost.epoch + n_steps * (
                    init_left * cost.init_step + (epochs - init_left) * cost.step)
            if status in ("train", "remake", "stale") and spec.teacher:
                key = (spec.teacher_run, spec.method, spec.method_options, spec.recipe.fit_points, n_train)
                seconds += n_train * (cost.reuse_image if key in fitted else cost.fit_image)
                if shared_fits:
                    fitted.add(key)
        rescaled = rescaled_options(spec)
        recipe = f"{spec.recipe.name}, {spec.recipe.epochs} epochs" + (f" ({rescaled})" if rescaled else "")
        cost = costs.get(_setting(spec)) if status not in KEPT else None
        rows.append(RunEstimate(spec.run_id, spec.role, spec.method, spec.pair or spec.student, status, epochs,
                                seconds, note, options_text(spec.method_options), recipe,
                                cost.peak_bytes if cost else 0.0, spec.recipe.batch_size / cost.step if cost else 0.0))
    return Estimate(tuple(rows), len(costs), steps, tuple(sorted({s.device for s, *_ in plan})),
                    prices.reused if prices else 0)


def format_estimate(est: Estimate, per_run: bool = False) -> str:
    """Runs per status and device-hours per method (teachers and assistants apart), the total, and the basis."""
    groups: dict[str, list[RunEstimate]] = {}
    for r in est.runs:
        label = "teacher" if r.role == "teacher" else r.method + (" (assistant)" if r.role == "assistant" else "")
        groups.setdefault(label, []).append(r)
    statuses = ("train", "resume", "remake", "cached", "stale") + tuple(
        s for s in ("import", "diverged") if any(r.status == s for r in est.runs))
    groups["total"] = list(est.runs)
    table = [[label, *(sum(r.status == s for r in runs) for s in statuses), sum(r.seconds for r in runs) / 3600]
             for label, runs in groups.items()]
    text = tabulate(table, headers=["method", *statuses, "device-h"], floatfmt=".3g")
    if per_run:
        rows = [[r.run_id, r.pair, r.recipe, r.options, r.status, r.epochs, f"{r.seconds:.1f}", r.note]
                for r in est.runs]
        text = tabulate(rows, headers=["run", "pair", "recipe", "options", "status", "epochs left", "est. s",
                                       "why"]) + "\n\n" + text
    remade = [f"{r.run_id} ({r.note})" for r in est.runs if r.status == "remake"]
    if remade:
        text += "\n\nfinished without weights, made again because runs to train need them: " + ", ".join(remade)
    devices = "/".join(est.devices) or "no device"
    to_train = sum(r.status in ("train", "resume", "remake", "stale") for r in est.runs)
    reused = (f" ({est.reused} of them priced by an earlier run on this machine and code, under whatever load it "
              f"had then; the prices live in ${CACHE_ENV}, default ~/.cache/kdbench)") if est.reused else ""
    return (f"{text}\n\n{to_train} runs to train; estimate: {est.total_s / 3600:.3g} device-hours "
            f"({est.total_s / 60:.1f} min); measured "
            f"{est.steps} training steps (after {WARMUP_STEPS} warm-up) and test batches of each of {est.settings} "
            f"settings{reused} on {devices}, times the recipes; includes teacher forwards and evaluation, and each "
            f"method's offline fit (prepare) measured on {est.steps} batches a pass and scaled with the training "
            f"subset (an upper bound where the recipe caps fit points); excludes loading the dataset. Nothing was "
            f"written to the results.")
