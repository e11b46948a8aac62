"""Every distillation method runs end to end through the harness for every reference pair (CPU, synthetic)."""

import math

import pytest
from conftest import tiny_sweep

from kdbench.harness import run_sweep
from kdbench.spec import Recipe

REFERENCE_PAIRS = [("vgg13", "vgg8"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
                   ("resnet56", "resnet20"), ("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2")]
METHODS = ("kd", "fitnet", "semckd")
# Two steps of batch 8: enough to exercise every forward, loss and optimiser path.
FEW_STEPS = Recipe("few-steps", epochs=1, batch_size=8, train_subset=16, test_subset=16, warmup_steps=0)


# SemCKD on ResNet50 -> MobileNetV2 trains 849 M auxiliary parameters (test_semckd checks that count on the meta
# device); allocating and stepping them took 2.5 of the suite's minutes, so that one pair runs the other methods.
HEAVY = {("ResNet50", "MobileNetV2"): ("semckd",)}


@pytest.mark.slow
@pytest.mark.parametrize("pair", REFERENCE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_every_method_trains_on_every_reference_pair(env, pair):
    methods = tuple(m for m in METHODS if m not in HEAVY.get(pair, ()))
    records = run_sweep(tiny_sweep(methods=methods, pair=pair, recipe=FEW_STEPS).plan(), env)
    teacher, *students = records
    assert [r.spec.method for r in students] == list(methods)
    for record in records:
        assert record.status == "finished", (record.spec.method, record.error)
    for record in students:
        # the harness fails a run whose teacher changed; the teacher's weights file is untouched
        assert record.provenance["teacher_weights_sha256"] == students[0].provenance["teacher_weights_sha256"]
        assert record.metrics["iters_per_epoch"] == 2 and record.metrics["teacher_top1"] >= 0
        assert all(v == v for v in record.epochs[0].values())  # no NaN
    extra = {r.spec.method: r.metrics["extra_params_train"] for r in students}
    assert extra["kd"] == 0 and extra["fitnet"] > 0 and extra.get("semckd", math.inf) > extra["fitnet"]
