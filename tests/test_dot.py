"""DOT (methods/dot.py) and the method-owned optimiser step it needs (Method.step): the update against a hand
computation, its state across a resume, its refusals, and a run through the harness."""

import math

import pytest
import torch
from conftest import method_context, tiny_sweep
from test_zoo_e2e import FEW_STEPS

from kdbench.errors import KdbenchError
from kdbench.harness import run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import Method

KD_DOT = method_class("kd_dot")
LR, WD, MOMENTUM, DELTA = 0.1, 0.01, 0.9, 0.075


def _method(**options):
    resolved = {**dict(KD_DOT.resolve_options({}, "official")), **options}
    return KD_DOT(method_context("kd_dot", {}, {}, "official", resolved, batch_size=2))


def _params():
    """Three parameters: one the task loss reaches, one the distillation loss reaches, one both reach."""
    return [torch.nn.Parameter(torch.tensor([1.0, -2.0])) for _ in range(3)]


def _terms(params, scale=1.0):
    task_only, kd_only, both = params
    return {"ce": scale * (task_only.pow(2).sum() + both.sum()), "kd": scale * (kd_only.pow(3).sum() + 2 * both.sum())}


def test_the_update_follows_dots_two_momenta():
    """Two steps by hand: the task buffer decays at m − δ and the distillation buffer at m + δ where a parameter
    gets both gradients, both at m where it gets one; weight decay goes with the task gradient, or with the
    distillation gradient after its first step where there is no task gradient."""
    params = _params()
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    method = _method()
    expected = [p.detach().clone() for p in params]
    buffers = {}
    for step in range(2):
        task_only, kd_only, both = expected
        grads = {"task": {0: 2 * task_only, 2: torch.ones(2)}, "kd": {1: 3 * kd_only**2, 2: 2 * torch.ones(2)}}
        for k, g in grads["task"].items():  # the task pass, every parameter first
            d = g + WD * expected[k]
            rate = MOMENTUM - DELTA if k in grads["kd"] else MOMENTUM
            buffers["t", k] = d if step == 0 else rate * buffers["t", k] + d
            expected[k] = expected[k] - LR * buffers["t", k]
        for k, g in grads["kd"].items():  # then the distillation pass
            if step == 0:
                buffers["k", k] = g
            elif k in grads["task"]:
                buffers["k", k] = (MOMENTUM + DELTA) * buffers["k", k] + g
            else:
                buffers["k", k] = MOMENTUM * buffers["k", k] + g + WD * expected[k]
            expected[k] = expected[k] - LR * buffers["k", k]
        method.step(optimizer, _terms(params))
        for p, e in zip(params, expected):
            assert torch.allclose(p.detach(), e, atol=1e-6), step
    assert all(p.grad is None for p in params)  # the run's SGD and its buffers are not used
    assert not optimizer.state


def test_the_buffers_live_in_the_state_dict_so_a_resumed_run_steps_as_an_unbroken_one():
    params, resumed = _params(), _params()
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    method = _method()
    method.step(optimizer, _terms(params))
    state = method.state_dict()
    with torch.no_grad():
        for p, q in zip(resumed, params):
            p.copy_(q)
    fresh = _method()
    fresh.load_state_dict(state)
    fresh.step(torch.optim.SGD(resumed, lr=LR, momentum=MOMENTUM, weight_decay=WD), _terms(resumed, 0.5))
    method.step(optimizer, _terms(params, 0.5))
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))


def test_the_default_step_is_the_run_optimisers_step_on_the_sum():
    params, plain = _params(), _params()
    Method.step(_method(), torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD), _terms(params))
    sgd = torch.optim.SGD(plain, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sum(_terms(plain).values()).backward()
    sgd.step()
    assert all(torch.equal(p, q) for p, q in zip(params, plain))


@pytest.mark.parametrize("optimiser, delta, message", [
    ({"nesterov": True}, DELTA, "no Nesterov form"),
    ({}, 0.2, "momentum 0.9 ± delta 0.2 leaves \\[0, 1\\)"),
])
def test_settings_dot_cannot_run_fail_in_one_line(optimiser, delta, message):
    params = _params()
    with pytest.raises(KdbenchError, match=message):
        _method(delta=delta).step(torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **optimiser), _terms(params))


def test_kd_dot_is_kds_loss_with_mdistillers_delta():
    options = dict(KD_DOT.resolve_options({}, "official", "resnet56", "resnet20"))
    assert (options["ce_weight"], options["kd_weight"], options["temperature"], options["delta"]) == (
        0.1, 0.9, 4.0, 0.075)
    with pytest.raises(KdbenchError, match="kd_dot.delta must be a finite number >= 0"):
        KD_DOT.resolve_options({"delta": "-0.1"}, "official")


def test_kd_dot_trains_end_to_end(env):
    teacher, run = run_sweep(tiny_sweep(methods=("kd_dot",), pair=("resnet14", "resnet8"), recipe=FEW_STEPS).plan(),
                             env)
    assert run.status == "finished", run.error
    assert {k for k in run.epochs[0] if k.startswith("loss_")} == {"loss_ce", "loss_kd"}
    assert math.isfinite(run.epochs[0]["loss"]) and run.metrics["extra_params_train"] == 0


def test_an_interrupted_kd_dot_run_resumes_with_its_buffers_and_ends_as_an_unbroken_one(tmp_path, monkeypatch):
    from conftest import run_interrupted
    from test_zoo_e2e import FEW_STEPS as ONE_EPOCH

    from kdbench.harness import RunEnv
    from kdbench.results import ResultsStore

    recipe = ONE_EPOCH.overridden(epochs=3)
    teacher, spec = tiny_sweep(methods=("kd_dot",), pair=("resnet14", "resnet8"), recipe=recipe).plan()
    env = RunEnv(ResultsStore(tmp_path / "runs"), progress=False)
    run_sweep([teacher], env)
    unbroken = run_sweep([spec], RunEnv(ResultsStore(tmp_path / "runs"), progress=False, reuse_stale=False))[0]
    resumed_env = RunEnv(ResultsStore(tmp_path / "resumed"), progress=False)
    run_sweep([teacher], resumed_env)
    run_interrupted(monkeypatch, [spec], resumed_env, 3)  # the teacher check, epoch 1, then in epoch 2
    resumed = run_sweep([spec], resumed_env)[0]
    assert resumed.status == unbroken.status == "finished"
    assert [e["loss"] for e in resumed.epochs] == [e["loss"] for e in unbroken.epochs]
