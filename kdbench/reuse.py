"""Which recorded runs a sweep keeps as they are, and which it must make again: the rule that the harness, every
executor and the dry run share. A finished run is kept when the current code made it (or ``--reuse-stale``), with or
without its weights; a run that diverged under the current code is kept failed; a kept run without weights is made
again only when a run that trains in this sweep needs it as teacher or assistant. Reads only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdbench.errors import RunFailed
from kdbench.fingerprint import fingerprint, stale_reason
from kdbench.progress import log
from kdbench.results import DamagedRun, ResultsStore, RunRecord
from kdbench.spec import RunSpec

if TYPE_CHECKING:
    from kdbench.harness import RunEnv

NON_FINITE = "non-finite training loss"  # how a diverged run's error begins (the harness raises it)


def kept_record(spec: RunSpec, env: RunEnv, repair: bool = True) -> RunRecord | None:
    """The run's finished record when a sweep keeps it: its weights are not damaged (they may be missing) and the
    current code made it (or ``env.reuse_stale``). ``repair`` False reads only (``ResultsStore.finished_record``)."""
    record = env.store.finished_record(spec.run_id, repair)
    if record is not None and (env.reuse_stale or stale_reason(record, fingerprint(spec)) is None):
        return record
    return None


def diverged_before(spec: RunSpec, env: RunEnv) -> RunRecord | None:
    """The run's failed record when it failed with a non-finite loss under the current code: training is deterministic
    per machine and build, so a second try fails the same way (SemCKD at beta = 400 on resnet56:resnet20), and a sweep
    keeps the failure instead of paying for it again, unless ``env.retry_failed``. Reads only. Other failures (out of
    memory, a teacher that failed, a bug since fixed) are tried again."""
    if env.retry_failed:
        return None
    try:
        record = env.store.load_record(spec.run_id, repair=False)
    except DamagedRun:
        return None
    diverged = (record is not None and record.status == "failed" and (record.error or "").startswith(
        f"{RunFailed.__name__}: {NON_FINITE}"))
    return record if diverged and record.provenance.get("code_fingerprint") == fingerprint(spec)[
        "code_fingerprint"] else None


def weights_to_remake(specs: list[RunSpec], env: RunEnv) -> dict[str, int]:
    """The kept runs of a plan (``specs``, trainers first) that have no weights and that runs which will train need
    as teacher or assistant: run id -> how many such runs. A run re-made for its weights trains too, so the runs
    that teach it are counted in turn. The one rule of every executor and of the dry run; reads only."""
    kept = {spec.run_id for spec in specs if kept_record(spec, env, repair=False)}
    needed: dict[str, int] = {}
    for spec in reversed(specs):  # a run before the runs that teach it
        if spec.run_id in kept and spec.run_id not in needed:
            continue
        for trainer in (spec.teacher_run, *spec.assistant_runs):
            if trainer in kept and not env.store.weights_path(trainer).is_file():
                needed[trainer] = needed.get(trainer, 0) + 1
    return {spec.run_id: needed[spec.run_id] for spec in specs if spec.run_id in needed}  # in plan order


def remakes_announced(specs: list[RunSpec], env: RunEnv) -> dict[str, int]:
    """``weights_to_remake`` for an executor about to run the plan, said in one line when there are any."""
    remake = weights_to_remake(specs, env)
    if remake:
        log.warning("%d finished run(s) have no weights and will be made again, because runs to train need them: %s",
                    len(remake), ", ".join(remake))
    return remake


def failed_record(spec: RunSpec, error: BaseException, store: ResultsStore) -> RunRecord:
    """A failed record keeping the epochs the run completed before it failed."""
    reason = f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]
    partial = store.load_record(spec.run_id)
    epochs = partial.epochs if partial else []
    main = sum(e["epoch"] >= 1 for e in epochs)  # as measure.run_metrics counts: an init stage's epochs apart
    metrics = {"epochs_completed": float(main), **({"init_epochs": float(len(epochs) - main)} if main < len(epochs)
                                                   else {})}
    # the code that failed, also when no epoch ended (diverged_before compares it with the current code)
    provenance = {**fingerprint(spec), **(partial.provenance if partial else {})}
    return RunRecord(spec, "failed", metrics, epochs, provenance, reason)
