from dataclasses import replace

import pytest
from conftest import TINY, tiny_sweep

from kdbench.errors import KdbenchError
from kdbench.spec import PROTOCOLS, RECIPES, Pair, Recipe, RunSpec, teacher_recipe_of


def test_paper_recipe_is_repdistiller_schedule():
    paper = RECIPES.get("paper")
    assert (paper.epochs, paper.batch_size, paper.momentum, paper.weight_decay) == (240, 64, 0.9, 5e-4)
    assert paper.milestone_epochs() == (150, 180, 210)
    lrs = {e: paper.lr_at(e, 0.05) for e in (0, 149, 150, 179, 180, 209, 210, 239)}
    assert lrs[0] == lrs[149] == 0.05
    assert lrs[150] == pytest.approx(5e-3) and lrs[179] == pytest.approx(5e-3)
    assert lrs[180] == pytest.approx(5e-4) and lrs[209] == pytest.approx(5e-4)
    assert lrs[210] == pytest.approx(5e-5) and lrs[239] == pytest.approx(5e-5)


def test_overriding_epochs_scales_milestones_and_rejects_nonsense():
    assert RECIPES.get("paper").overridden(epochs=24).milestone_epochs() == (15, 18, 21)
    assert RECIPES.get("paper").overridden(batch_size=None).batch_size == 64
    with pytest.raises(KdbenchError, match="--epochs must be a positive integer"):
        RECIPES.get("short").overridden(epochs=0)
    with pytest.raises(KdbenchError, match="--train-subset"):
        RECIPES.get("short").overridden(train_subset=-3)


def test_run_id_is_stable_and_sensitive():
    spec = RunSpec(dataset="synthetic", student="resnet8", method="student", seed=0, recipe=TINY)
    assert spec.run_id == RunSpec.from_dict(spec.to_dict()).run_id
    assert spec.run_id == RunSpec(dataset="synthetic", student="resnet8", method="student", seed=0,
                                  recipe=Recipe("tiny", epochs=3, batch_size=32, warmup_steps=2)).run_id
    changed = [RunSpec(dataset="synthetic", student="resnet8", method="student", seed=1, recipe=TINY),
               RunSpec(dataset="synthetic", student="resnet8", method="student", seed=0, recipe=TINY,
                       precision="bf16"),
               RunSpec(dataset="synthetic", student="resnet8", method="student", seed=0,
                       recipe=TINY.overridden(epochs=4))]
    assert len({spec.run_id, *(c.run_id for c in changed)}) == 4


def test_pair_parsing():
    assert Pair.parse("vgg13:vgg8") == Pair("vgg13", "vgg8")
    for bad in ("vgg13", "vgg13:", ":vgg8", "a:b:c"):
        with pytest.raises(KdbenchError, match="malformed pair"):
            Pair.parse(bad)


def test_plan_puts_shared_teacher_first_and_baseline_without_teacher():
    runs = tiny_sweep(seeds=(0, 1, 2), protocol="crd").plan()
    teacher, *students = runs
    assert (teacher.role, teacher.student, teacher.method) == ("teacher", "resnet14", "student")
    assert teacher.protocol == "none"
    assert [s.seed for s in students] == [0, 1, 2]
    # the CE baseline does not depend on the teacher, so it is shared by every pair with that student
    assert all(s.teacher is None and s.teacher_run is None and s.protocol == "none" for s in students)
    assert len({r.run_id for r in runs}) == 4


def test_teacher_is_shared_across_protocols_and_student_seeds():
    a = tiny_sweep(seeds=(0,), protocol="crd").plan()[0]
    b = tiny_sweep(seeds=(5,), protocol="semckd").plan()[0]
    assert a.run_id == b.run_id


@pytest.mark.parametrize("changes, message", [
    (dict(methods=("nope",)), "unknown method 'nope'; valid methods: student"),
    (dict(pair=("resnet14", "resnet9")), "unknown model 'resnet9'"),
    (dict(dataset="imagenet-21k"), "unknown dataset 'imagenet-21k'"),
    (dict(protocol="hinton"), "unknown protocol 'hinton'; valid protocols: official, crd, semckd"),
])
def test_plan_rejects_unknown_names(changes, message):
    dataset = changes.pop("dataset", None)
    sweep = tiny_sweep(**changes)
    if dataset:
        sweep = tiny_sweep(**changes).__class__(**{**sweep.__dict__, "dataset": dataset})
    with pytest.raises(KdbenchError, match=message):
        sweep.plan()


def test_protocol_and_method_options_are_part_of_distillation_runs():
    crd = tiny_sweep(methods=("kd",), protocol="crd").plan()[1]
    semckd = tiny_sweep(methods=("kd",), protocol="semckd").plan()[1]
    assert (crd.protocol, semckd.protocol) == ("crd", "semckd") and crd.run_id != semckd.run_id
    assert tiny_sweep().plan()[1].protocol == "none"  # the CE baseline has no loss weights to choose
    assert PROTOCOLS[0] == "official"  # each method as its official code runs it, unless asked otherwise
    tuned = tiny_sweep(methods=("fitnet", "kd"), method_options=(("fitnet", "beta", "50"),)).plan()
    fitnet, kd = tuned[1], tuned[2]
    assert dict(fitnet.method_options) == {"hint_layer": 2, "beta": 50.0, "ce_weight": 1.0, "kd_weight": 0.0,
                                           "temperature": 4.0, "kl_reduction": "batchmean"}
    assert dict(kd.method_options) == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0,
                                       "kl_reduction": "batchmean"}
    assert RunSpec.from_dict(fitnet.to_dict()) == fitnet


def test_teachers_have_a_recipe_of_their_own_in_every_students_run_id():
    # the tiny synthetic set (640 training, 320 test images) holds no 5,000-image validation split: a smaller one
    cpu, cpu_teacher = (replace(RECIPES.get(name), val_split=64) for name in ("cpu", "cpu-teacher"))
    plan = tiny_sweep(methods=("student", "kd", "takd"), pair=("resnet56", "resnet20"), recipe=cpu,
                      teacher_recipe=cpu_teacher).plan()
    teacher, *rest = plan
    # its subsets, too, are dropped where they hold a whole split of the tiny set
    assert teacher.role == "teacher" and teacher.recipe == replace(cpu_teacher, train_subset=None, test_subset=None)
    assert cpu_teacher.train_subset is None and cpu.train_subset == 1000  # every image vs a low-data subset
    assert RECIPES.get("cpu-teacher").val_split == RECIPES.get("cpu").val_split == 5000 and cpu.test_subset is None
    # students train with the students' recipe, its subsets dropped where they hold a whole split of the tiny
    # synthetic set (640 training, 320 test images); teacher assistants are teachers of the next step of their chain:
    # they train with the teacher recipe and the teacher's seed, once for every student seed
    assert {r.recipe for r in rest if r.role == "student"} == {replace(cpu, train_subset=None, test_subset=None)}
    assistants = [r for r in rest if r.role == "assistant"]
    assert len(assistants) == 2 and {r.recipe for r in assistants} == {teacher.recipe}
    assert {r.seed for r in assistants} == {teacher.seed}
    several = tiny_sweep(methods=("takd",), pair=("resnet56", "resnet20"), recipe=cpu, teacher_recipe=cpu_teacher,
                         seeds=(0, 1, 2)).plan()
    assert [r.role for r in several] == ["teacher", "assistant", "assistant", "student", "student", "student"]

    # a student override (--epochs) does not reach the teacher
    longer = tiny_sweep(methods=("kd",), pair=("resnet56", "resnet20"), recipe=cpu.overridden(epochs=30),
                        teacher_recipe=cpu_teacher).plan()
    assert longer[0].run_id == teacher.run_id
    # another teacher recipe is another teacher run, and so every taught run's id changes; the CE student's does not
    other = cpu_teacher.overridden(epochs=9)
    moved = tiny_sweep(methods=("student", "kd", "takd"), pair=("resnet56", "resnet20"), recipe=cpu,
                       teacher_recipe=other).plan()
    assert moved[0].recipe.epochs == 9 and moved[0].run_id != teacher.run_id
    for before, after in zip(plan[1:], moved[1:]):
        assert (before.run_id == after.run_id) == (before.method == "student"), before.run_id
    # the smoke and paper recipes name themselves; letKD's native recipe names RepDistiller's teachers
    assert [teacher_recipe_of(RECIPES.get(n)).name for n in ("short", "paper", "letkd-native", "cpu")] == [
        "short-teacher", "paper", "paper", "cpu-teacher"]
    native = RECIPES.get("letkd-native")
    assert (native.nesterov, native.pad_mode, native.epochs) == (True, "reflect", 240)


def test_fitnet_hint_layer_and_logit_weights_follow_the_protocol_in_the_plan():
    hints = {p: dict(tiny_sweep(methods=("fitnet",), protocol=p).plan()[1].method_options)
             for p in ("official", "crd", "semckd")}
    assert {p: (o["hint_layer"], o["kd_weight"]) for p, o in hints.items()} == {
        "official": (2, 0.0), "crd": (2, 0.0), "semckd": (1, 1.0)}
    # the first teacher assistant learns by plain KD with the chain method's logit options, shared by TAKD and DGKD
    plan = tiny_sweep(methods=("takd", "dgkd"), pair=("resnet56", "resnet20"), protocol="official").plan()
    first = {r for r in plan if r.role == "assistant" and r.method == "kd"}
    assert len(first) == 1
    assert dict(next(iter(first)).method_options) == {"ce_weight": 0.0, "kd_weight": 1.0, "temperature": 5.0,
                                                      "kl_reduction": "mean"}
