"""The method zoo (RepDistiller and mdistiller) end to end: every method trains through the harness, its run records
its extra parameters, and `kdbench list` shows it."""

from dataclasses import replace

import pytest
from conftest import tiny_sweep

from kdbench.cli import main
from kdbench.harness import run_sweep
from kdbench.spec import Recipe

ZOO = ("at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "kdsvd", "ofd", "reviewkd", "dkd")
# One epoch of two steps; the init stages of AB, FT and FSP get one epoch of their own.
FEW_STEPS = Recipe("few-steps", epochs=1, batch_size=8, train_subset=16, test_subset=16, warmup_steps=0)
INIT = (("ab", "init_epochs", "1"), ("ft", "init_epochs", "1"), ("fsp", "init_epochs", "1"))


def test_kdbench_list_shows_the_zoo(capsys):
    assert main(["list", "methods"]) == 0
    listed = {line.split(" ")[0] for line in capsys.readouterr().out.splitlines()}  # the table's first column
    assert set(ZOO) <= listed


@pytest.mark.slow
@pytest.mark.parametrize("pair, protocol, teacher_steps", [(("resnet14", "resnet8"), "semckd", 2),
                                                           (("resnet56", "resnet20"), "official", 24),
                                                           (("vgg13", "vgg8"), "official", 2)])
def test_every_zoo_method_trains_end_to_end(env, pair, protocol, teacher_steps):
    """On a small pair under the semckd protocol, so every feature term trains beside a logit-KD term, and on the
    reference set's pairs under the default (official) protocol. The resnet56 teacher takes 24 steps: on the
    features of a two-step one, in eval mode, FT's paraphraser diverges (inf) in its first init epoch."""
    teacher = replace(FEW_STEPS, name="few-teacher-steps", epochs=teacher_steps // 2)
    records = run_sweep(tiny_sweep(methods=ZOO, pair=pair, recipe=FEW_STEPS, teacher_recipe=teacher,
                                   protocol=protocol, method_options=INIT).plan(), env)
    teacher, *students = records
    assert [r.spec.method for r in students] == list(ZOO)
    for record in records:
        assert record.status == "finished", (record.spec.method, record.error)
        assert all(v == v for e in record.epochs for v in e.values() if isinstance(v, float))  # no NaN
    extra = {r.spec.method: r.metrics["extra_params_train"] for r in students}
    assert all(extra[m] > 0 for m in ("cc", "vid", "ft", "crd", "ofd", "reviewkd"))
    assert all(extra[m] == 0 for m in ("at", "sp", "rkd", "pkt", "fsp", "nst", "kdsvd", "dkd"))
    init = {r.spec.method: r.metrics.get("init_epochs", 0) for r in students}
    assert {m for m, n in init.items() if n} == {"ab", "ft", "fsp"}
