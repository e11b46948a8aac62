"""CTKD (methods/ctkd.py): the cosine λ curriculum, gradient reversal, the learnt temperature and the loss against
hand computations, presets, and a run through the harness."""

import math

import pytest
import torch
from conftest import method_context, tiny_sweep
from test_zoo_e2e import FEW_STEPS

from kdbench.harness import run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import StepOutputs
from kdbench.methods.ctkd import GradientReversal, curriculum_lambda

CTKD = method_class("ctkd")


def _built(protocol="official", epochs=240, **options):
    resolved = {**dict(CTKD.resolve_options({}, protocol, "resnet56", "resnet20", epochs)), **options}
    return CTKD(method_context("ctkd", {}, {}, protocol, resolved, batch_size=4))


def test_lambda_follows_the_official_cosine_from_0_to_minus_1_over_10_epochs():
    """CosineDecay(max 0, min −1, loops 10).get_value(e) at the 1-indexed epoch e = kdbench's epoch + 1."""
    assert curriculum_lambda(0, 10) == pytest.approx((math.cos(math.pi / 10) + 1) / 2 - 1)  # -0.0245
    assert curriculum_lambda(4, 10) == pytest.approx(-0.5)
    assert curriculum_lambda(9, 10) == curriculum_lambda(200, 10) == pytest.approx(-1.0)
    lambdas = [curriculum_lambda(e, 10) for e in range(10)]
    assert all(a > b for a, b in zip(lambdas, lambdas[1:]))  # the curriculum only hardens
    # counted in epochs: 10 at 240, in proportion under a shorter recipe (Method.epoch_options)
    assert dict(CTKD.resolve_options({}, "official", epochs=240))["lambda_epochs"] == 10
    assert dict(CTKD.resolve_options({}, "official", epochs=30))["lambda_epochs"] == 1


def test_gradient_reversal_is_the_identity_forward_and_scales_the_gradient_backward():
    x = torch.tensor([2.0, -1.0], requires_grad=True)
    y = GradientReversal.apply(x, -0.5)
    assert torch.equal(y, x.detach())
    (3 * y).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-1.5, -1.5]))


def test_the_loss_and_the_temperature_gradient_match_a_hand_computation():
    """0.1·CE + 0.9·τ²·KL at τ = 1 + 20·sigmoid(θ), θ = 1; θ's gradient is λ times the loss's own."""
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5), torch.tensor([0, 3, 1])
    method, epoch = _built(), 4  # λ = −0.5
    terms = method.losses(StepOutputs(labels=y, student_logits=z_s, student_features={}, teacher_logits=z_t,
                                      epoch=epoch))
    assert set(terms) == {"ce", "kd"}
    tau = 1 + 20 / (1 + math.exp(-1))
    kl = 0.0
    for row_s, row_t in zip(z_s.tolist(), z_t.tolist()):
        p_t = [math.exp(v / tau) / sum(math.exp(u / tau) for u in row_t) for v in row_t]
        log_q = [v / tau - math.log(sum(math.exp(u / tau) for u in row_s)) for v in row_s]
        kl += sum(p * (math.log(p) - q) for p, q in zip(p_t, log_q))
    assert terms["kd"].dim() == 0 and terms["kd"].item() == pytest.approx(0.9 * tau**2 * kl / 3, rel=1e-4)
    (terms["ce"] + terms["kd"]).backward()
    theta = torch.ones(1, requires_grad=True)  # the same loss without the reversal
    plain = 0.9 * torch.nn.functional.kl_div(torch.log_softmax(z_s.detach() / (1 + 20 * torch.sigmoid(theta)), 1),
                                             torch.softmax(z_t / (1 + 20 * torch.sigmoid(theta)), 1),
                                             reduction="batchmean") * (1 + 20 * torch.sigmoid(theta)) ** 2
    plain.sum().backward()
    assert method.global_t.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=1e-4)
    assert method.extra_params_train() == 1


def test_ctkd_trains_end_to_end(env):
    teacher, run = run_sweep(tiny_sweep(methods=("ctkd",), pair=("resnet14", "resnet8"), recipe=FEW_STEPS).plan(),
                             env)
    assert run.status == "finished", run.error
    assert {k for k in run.epochs[0] if k.startswith("loss_")} == {"loss_ce", "loss_kd"}
    assert run.metrics["extra_params_train"] == 1 and math.isfinite(run.epochs[0]["loss"])
