"""Where a training step's time goes (``kdbench run ... --profile``), and how close it comes to the machine's peak.

Each distinct setting of the plan (method, pair, device, precision, layout, batch size) is built as the dry run
builds it (untrained trainers of the right architectures, the harness's own ``_assemble`` and ``_train_epoch``) and
timed four ways on the same modules:

- ``harness``: the harness's steps on its loader, as a run takes them (the step time a run records: augmentation
  and the loop's bookkeeping excluded, as in ``train_images_per_s``; ``epoch`` adds them back);
- ``instrumented``: the same steps with a clock at every phase boundary: ``data`` (the loader's augmentation and the
  loop between steps), ``student_forward``, ``frozen_forwards`` (teacher and assistants, no grad), ``loss`` (the
  method's terms), ``backward`` (with ``zero_grad``) and ``optimizer``. On CUDA each boundary synchronises, so the
  phases add up to more than an unsynchronised step;
- ``fixed_batch``: the harness's steps on one pre-made batch, so the difference to ``harness`` is the data path;
- ``bare``: a minimal PyTorch loop on that batch, the same architectures, CE + KD₄ against the teacher (CE alone for
  the baseline) and SGD, no harness: what the step costs without kdbench.

The achieved rate is the step's FLOPs over its time: the matmuls and convolutions of one eager step as torch's
``FlopCounterMode`` counts them (the student's forward and backward, the frozen forwards, and the method's own modules
and losses, which dominate SemCKD's step); the peak is the best of a large matmul and a large 3×3 convolution
measured on the same device and precision. Results are tidy rows (one per setting and metric) in
``<results-dir>/profile.parquet`` (rows of the same setting and host replaced) and a plot beside it.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kdbench import harness
from kdbench.compiled import compile_forward
from kdbench.estimate import WARMUP_STEPS, _loader, _Sample, _setting, _timed, _untrained
from kdbench.execution import autocast
from kdbench.measure import StepTimer, provenance
from kdbench.methods.base import KD_TEMPERATURE, kd_divergence
from kdbench.models import create_model
from kdbench.parts import Parts
from kdbench.results import ResultsStore, atomic_write
from kdbench.spec import RunSpec

PHASES = ("data", "student_forward", "frozen_forwards", "loss", "backward", "optimizer")
VARIANTS = ("harness", "fixed_batch", "bare")


class _Clock:
    """Seconds per phase of each step, from hooks on the student, the trainers, the method and the optimiser. Time
    outside the forwards, the loss, backward and the optimiser (the loader's next batch, the loop) counts as data."""

    def __init__(self, parts, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        self._phase, self._since = "data", None
        self._handles = []
        for model, phase in ((parts.student, "student_forward"), *((t, "frozen_forwards") for t in parts.trainers)):
            self._handles += [model.register_forward_pre_hook(lambda *_, p=phase: self._enter(p)),
                              model.register_forward_hook(lambda *_: self._enter("data"))]
        optimizer = parts.optimizer_of("main")
        self._handles += [optimizer.register_step_pre_hook(lambda *_: self._enter("optimizer")),
                          optimizer.register_step_post_hook(lambda *_: self._end_step())]
        losses, self._method = parts.method.losses, parts.method

        def timed_losses(out):
            self._enter("loss")
            terms = losses(out)
            self._enter("backward")  # zero_grad, the sum of the terms and backward follow
            return terms

        parts.method.losses = timed_losses

    def _enter(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._since is not None:
            self._current[self._phase] += now - self._since
        self._phase, self._since = phase, now

    def _end_step(self) -> None:
        self._enter("data")
        self.steps.append(dict(self._current))
        self._current = defaultdict(float)

    def medians(self) -> dict[str, float]:
        """Median seconds per phase over the steps that had a whole data phase (all but the first)."""
        steps = self.steps[1:] or self.steps
        return {p: statistics.median(s.get(p, 0.0) for s in steps) for p in PHASES}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        del self._method.losses  # back to the class's method


class _FixedBatch(_Sample):
    """The loader cut to ``batches`` steps of one pre-made batch: the harness's loop without its data path."""

    def __init__(self, loader, batches: int, batch):
        super().__init__(loader, batches)
        self.batch = batch

    def train_epoch(self, seed: int, epoch: int, positions: bool = False, views: tuple[str, ...] = ()):
        batch = self.batch if positions else self.batch[:2]
        return iter([(*batch, *self.batch[3:]) if positions and views else batch] * self.steps_per_epoch)


def _step_seconds(parts, loader, spec: RunSpec, device: torch.device) -> float:
    """Median seconds of the harness's steady-state step on ``loader``."""
    timer = StepTimer(device, 0)
    harness._train_epoch(parts, loader, spec, 1, timer, False)
    return statistics.median(s for s, _ in timer.flush())


def _bare_seconds(spec: RunSpec, data, device: torch.device, batch, steps: int) -> float:
    """Median seconds of a minimal loop's step: fresh models of the same architectures, CE + KD₄ (or CE), SGD."""
    memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
    info = data.info
    student = create_model(spec.student, info.num_classes, info.in_channels).to(device, memory_format=memory_format)
    teacher = (create_model(spec.teacher, info.num_classes, info.in_channels).to(device, memory_format=memory_format)
               .eval().requires_grad_(False) if spec.teacher else None)
    for model in (student, teacher):
        if model is not None:
            compile_forward(model, spec.compile)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = batch[0], batch[1]

    def step():
        with autocast(spec, device):
            logits = student(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
                loss = 0.1 * loss + 0.9 * kd_divergence(logits, target, KD_TEMPERATURE, "batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _median_seconds(step, device, steps, WARMUP_STEPS)


def _median_seconds(fn, device: torch.device, runs: int, warmup: int) -> float:
    """Median seconds of ``runs`` calls of ``fn`` (each synchronised), after ``warmup`` untimed ones."""
    times = [_timed(fn, device) for _ in range(warmup + runs)]
    return statistics.median(times[warmup:])


def peak_flops(device: torch.device, precision: str, seconds: float = 1.0) -> float:
    """FLOP/s of the better of a large square matmul (8192² on a GPU, 2048² on a CPU: each fills its device) and a
    batch-64, 128-channel, 32×32 3×3 convolution, in ``precision``: the rate this device reaches on large, dense work,
    the ceiling a training step is compared with. Calls run back to back and are synchronised once per timing, so a
    GPU's launch and synchronisation gaps stay out of its ceiling."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(64, 128, 32, 32, device=device, dtype=dtype)
    w = torch.randn(128, 128, 3, 3, device=device, dtype=dtype)
    work = ((lambda: a @ b, 2 * n ** 3), (lambda: F.conv2d(x, w, padding=1), 2 * 64 * 128 * 128 * 9 * 32 * 32))
    best = 0.0
    for fn, flops in work:
        _timed(fn, device)  # warm-up: kernel selection, workspace allocation
        calls = 1
        while (elapsed := _timed(lambda: [fn() for _ in range(calls)], device)) < seconds / 4:
            calls *= 2
        best = max(best, calls * flops / elapsed)
    return best


def _conv_step_seconds(device: torch.device, precision: str, channels_last: bool, reps: int = 3) -> float:
    """Median seconds of a 3×3, 64-channel convolution's forward and backward (batch 16, 16×16) in a setting."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, 64, 16, 16, device=device).to(memory_format=layout).requires_grad_()
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device, memory_format=layout)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = conv(x)
        out.float().sum().backward()

    return _median_seconds(step, device, reps, 1)


def slow_setting_note(device: torch.device, precision: str, channels_last: bool) -> str | None:
    """One line when the run's precision and layout train a convolution slower than plain fp32 on this device,
    measured now (a second at most); None when they are fp32 and contiguous, or not slower. On a CPU without bf16
    kernels in oneDNN (no AVX-512 BF16 or AMX), PyTorch runs bf16 convolutions on ``aten::_slow_conv2d``."""
    if precision == "fp32" and not channels_last:
        return None
    ratio = (_conv_step_seconds(device, precision, channels_last) / _conv_step_seconds(device, "fp32", False))
    if ratio < 1.2:
        return None
    what = " + ".join(["bf16 autocast"] * (precision == "bf16") + ["channels_last"] * channels_last)
    why = ""
    if device.type == "cpu" and precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        why = ("; oneDNN has no bf16 kernels for this CPU (no AVX-512 BF16 or AMX), so PyTorch runs bf16 "
               "convolutions on its slow reference path (aten::_slow_conv2d)")
    return (f"{what} trains a 3x3 convolution {ratio:.1f}x slower than fp32 on this {device.type} (measured just "
            f"now){why}; the runs will be slow, fp32 is faster here")


@dataclass(frozen=True)
class Profile:
    spec: RunSpec
    seconds: dict[str, float]  # variant -> median step seconds
    phases: dict[str, float]  # phase -> median seconds (instrumented steps)
    step_flops: float
    peak: float

    def rows(self, host: str) -> list[dict]:
        spec = self.spec
        setting = {"dataset": spec.dataset, "method": spec.method, "teacher": spec.teacher or "",
                   "student": spec.student, "device": spec.device, "precision": spec.precision,
                   "channels_last": spec.channels_last, "compile": spec.compile or "eager",
                   "batch_size": spec.recipe.batch_size, "host": host,
                   "torch": torch.__version__}
        batch = spec.recipe.batch_size
        values = {**{f"step_ms_{v}": 1e3 * s for v, s in self.seconds.items()},
                  **{f"img_per_s_{v}": batch / s for v, s in self.seconds.items()},
                  **{f"phase_ms_{p}": 1e3 * s for p, s in self.phases.items()},
                  "achieved_gflops": self.step_flops / self.seconds["harness"] / 1e9,
                  "peak_gflops": self.peak / 1e9,
                  "fraction_of_peak": self.step_flops / self.seconds["harness"] / self.peak}
        return [{**setting, "metric": k, "value": float(v)} for k, v in values.items()]


def _prepared(spec: RunSpec, env: harness.RunEnv, data, device: torch.device, loader) -> Parts:
    """The setting's parts as the harness assembles them, untrained frozen models, and the method's fitted state
    (centres, banks, heads) from a few batches."""
    parts = harness._assemble(spec, env, data, device, frozen=_untrained)
    with tempfile.TemporaryDirectory() as tmp:
        if parts.trainers:
            parts.method.prepare(harness._preparation(parts, _Sample(loader, 2, cycle=False), spec, ResultsStore(tmp)))
    return parts


def _step_flops(parts, spec: RunSpec, env: harness.RunEnv, data, device: torch.device, loader, batch) -> float:
    """FLOPs of one eager step of the setting on ``batch``: on the profiled ``parts`` (their timing done) when they run
    eagerly, else on an eager copy of the setting, since compiled kernels are invisible to the counter."""
    if spec.compile is not None:
        spec = dataclasses.replace(spec, compile=None)
        parts = _prepared(spec, env, data, device, loader)
    with FlopCounterMode(display=False) as counter:
        harness._train_epoch(parts, _FixedBatch(loader, 1, batch), spec, 0, StepTimer(device, 0), False)
    return float(counter.get_total_flops())


def profile_setting(spec: RunSpec, env: harness.RunEnv, steps: int, peaks: dict) -> Profile:
    device, data = torch.device(spec.device), harness._dataset(spec.dataset, env.data_dir, env.download)
    loader = _loader(spec, data, device)
    parts = _prepared(spec, env, data, device, loader)
    warm = _Sample(loader, WARMUP_STEPS)
    harness._train_epoch(parts, warm, spec, 0, StepTimer(device, 0), False)
    seconds = {"harness": _step_seconds(parts, _Sample(loader, steps), spec, device)}
    clock = _Clock(parts, device)
    try:
        harness._train_epoch(parts, _Sample(loader, steps + 1), spec, 2, StepTimer(device, 0), False)
    finally:
        clock.remove()
    batch = next(iter(loader.train_epoch(spec.seed, 0, positions=True, views=parts.method.views)))
    seconds["fixed_batch"] = _step_seconds(parts, _FixedBatch(loader, steps, batch), spec, device)
    seconds["bare"] = _bare_seconds(spec, data, device, batch, steps)
    key = (spec.device, spec.precision)
    if key not in peaks:
        peaks[key] = peak_flops(device, spec.precision)
    flops = _step_flops(parts, spec, env, data, device, loader, batch)
    return Profile(spec, seconds, clock.medians(), flops, peaks[key])


def profile(specs: list[RunSpec], env: harness.RunEnv, steps: int = 10) -> pd.DataFrame:
    """Profiles each distinct student setting of the plan (teachers are profiled as the CE baseline's settings)."""
    seen, rows, peaks = set(), [], {}
    hosts = {}
    for spec in specs:
        if spec.role == "teacher" or spec.pretrained or _setting(spec) in seen:
            continue
        seen.add(_setting(spec))
        if spec.device not in hosts:
            where = provenance(torch.device(spec.device))
            hosts[spec.device] = f"{where['hostname']}: {where['device_name']}, {where['cpu_threads']} threads"
        rows += profile_setting(spec, env, steps, peaks).rows(hosts[spec.device])
    return pd.DataFrame(rows)


def save(table: pd.DataFrame, results_dir: Path) -> Path:
    """Adds ``table`` to ``<results_dir>/profile.parquet`` (CSV beside it), replacing rows of the same setting and
    host, and draws the plot; returns the Parquet's path."""
    path = results_dir / "profile.parquet"
    if path.exists():
        old = pd.read_parquet(path)
        if "compile" not in old:  # tables made before --compile existed
            old["compile"] = "eager"
        merged = old.merge(table[SETTING].drop_duplicates(), on=SETTING, how="left", indicator=True)
        table = pd.concat([old[merged["_merge"].eq("left_only").to_numpy()], table], ignore_index=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: table.to_parquet(f, index=False))
    atomic_write(results_dir / "profile.csv", lambda f: table.to_csv(f, index=False))
    plot_profile(table, results_dir / "profile")
    return path


SETTING = ["host", "dataset", "method", "teacher", "student", "device", "precision", "channels_last", "compile",
           "batch_size"]


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """A row per setting and host, a column per metric."""
    return table.pivot_table(index=SETTING, columns="metric", values="value", sort=False).reset_index()


def plot_profile(table: pd.DataFrame, stem: Path) -> list[Path]:
    """``kdbench run --profile``'s table as one bar per setting: the instrumented step split by phase (stacked), with
    the harness's, the fixed-batch and the bare loop's step times as marks; saved as ``stem``.png and .svg."""
    import matplotlib.pyplot as plt

    settings = wide(table)
    labels = [f"{r.method} {f'{r.teacher}->' if r.teacher else ''}{r.student} · {r.dataset} · {r.precision}"
              f"{' · channels_last' if r.channels_last else ''}"
              f"{f' · compiled ({r.compile})' if r.compile not in ('eager', None) else ''}"
              for r in settings.itertuples()]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(settings) + 1.8), layout="constrained")
    left = pd.Series(0.0, index=settings.index)
    palette = plt.get_cmap("tab10")
    for k, phase in enumerate(PHASES):
        width = settings[f"phase_ms_{phase}"]
        ax.barh(labels, width, left=left, color=palette(k), label=phase.replace("_", " "))
        left += width
    for variant, marker in zip(VARIANTS, ("|", "x", "o")):
        ax.scatter(settings[f"step_ms_{variant}"], labels, marker=marker, color="black", s=80, zorder=3,
                   facecolors="none" if marker == "o" else None, label=f"step: {variant.replace('_', ' ')}")
    for y, r in enumerate(settings.itertuples()):
        end = max(left.iloc[y], *(getattr(r, f"step_ms_{v}") for v in VARIANTS))
        ax.annotate(f"{100 * r.fraction_of_peak:.1f}% of peak", (end, y), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.12)
    ax.set_xlabel("ms per training step (bars: instrumented step by phase)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    hosts = " | ".join(dict.fromkeys(settings["host"]))
    ax.set_title(f"Where a training step's time goes (batch {int(settings['batch_size'].iloc[0])})\n{hosts}",
                 fontsize=10)
    written = []
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix), dpi=150)
        written.append(stem.with_suffix(suffix))
    plt.close(fig)
    return written


def format_profile(table: pd.DataFrame) -> str:
    """One line per setting: img/s of the three variants, the phases' shares and the fraction of peak."""
    from tabulate import tabulate

    rows = []
    for _, r in wide(table).iterrows():
        total = sum(r[f"phase_ms_{p}"] for p in PHASES)
        rows.append([r.method, f"{r.teacher}->{r.student}" if r.teacher else r.student, r.dataset, r.precision,
                     "yes" if r.channels_last else "no", r.compile,
                     *(f"{r[f'img_per_s_{v}']:.0f}" for v in VARIANTS),
                     " ".join(f"{p.split('_')[0]} {100 * r[f'phase_ms_{p}'] / total:.0f}%" for p in PHASES),
                     f"{100 * r.fraction_of_peak:.1f}% of {r.peak_gflops:.0f}"])
    headers = ["method", "pair", "dataset", "precision", "channels_last", "compile", "img/s harness", "fixed batch",
               "bare", "instrumented step: share per phase", "GFLOP/s reached"]
    return tabulate(rows, headers, tablefmt="github")
