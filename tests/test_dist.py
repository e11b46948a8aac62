"""DIST (methods/dist.py): the relation terms against a hand computation with plain loops, the properties that
motivate them (invariance to a shift and a positive scale), the objective under every protocol, and gradients."""

import math

import pytest
import torch
from conftest import method_context, tiny_sweep
from test_zoo_e2e import FEW_STEPS

from kdbench.cli import main
from kdbench.harness import run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import StepOutputs
from kdbench.methods.dist import dist_relations, pearson_distance

DIST = method_class("dist")


def _pearson(a: list[float], b: list[float]) -> float:
    """Pearson correlation with DIST's 1e-8 in the denominator, in plain Python."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (den + 1e-8)


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_relations_match_a_hand_computation():
    z_s = [[1.0, -0.5, 2.0, 0.0], [0.3, 0.2, -1.0, 1.5], [-2.0, 0.5, 0.5, 1.0]]
    z_t = [[2.0, 0.0, 1.0, -1.0], [0.0, 1.0, -0.5, 2.5], [-1.0, -1.0, 2.0, 0.0]]
    t = 4.0
    y_s, y_t = [_softmax(r, t) for r in z_s], [_softmax(r, t) for r in z_t]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(y_s, y_t)) / 3
    columns = range(4)
    intra = 1 - sum(_pearson([r[c] for r in y_s], [r[c] for r in y_t]) for c in columns) / 4
    got_inter, got_intra = dist_relations(torch.tensor(z_s), torch.tensor(z_t), t)
    assert got_inter.item() == pytest.approx(t**2 * inter, rel=1e-5)
    assert got_intra.item() == pytest.approx(t**2 * intra, rel=1e-5)


def test_pearson_distance_ignores_shift_and_positive_scale_but_not_sign():
    torch.manual_seed(0)
    a = torch.rand(5, 7)
    assert pearson_distance(a, 3 * a + 0.25).item() == pytest.approx(0.0, abs=1e-6)
    assert pearson_distance(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert 0 < pearson_distance(a, torch.rand(5, 7)).item() < 2


def _build(protocol="official", **options):
    resolved = {**dict(DIST.resolve_options({}, protocol, "resnet56", "resnet20")), **options}
    return DIST(method_context("dist", {}, {}, protocol, resolved, batch_size=4))


def _outputs(student_logits, teacher_logits, labels):
    return StepOutputs(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels,
                       student_features={}, teacher_features={})


@pytest.mark.parametrize("protocol", ["official", "crd", "semckd"])
def test_the_objective_is_ce_plus_twice_dist_at_tau_4_under_every_protocol(protocol):
    """dist_cifar.yaml: CE weight 1, DIST weight 2 with β = γ = 1 and τ = 4 (kd_loss.py ``dist_t4``)."""
    torch.manual_seed(1)
    z_s, z_t, y = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10), torch.randint(0, 10, (6,))
    terms = _build(protocol).losses(_outputs(z_s, z_t, y))
    assert set(terms) == {"ce", "inter", "intra"}
    inter, intra = dist_relations(z_s, z_t, 4.0)
    assert terms["inter"].item() == pytest.approx(2 * inter.item())
    assert terms["intra"].item() == pytest.approx(2 * intra.item())
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(z_s, y).item())
    dropped = _build(protocol, gamma=0.0).losses(_outputs(z_s, z_t, y))
    assert set(dropped) == {"ce", "inter"}  # a zero weight leaves its term out


def test_gradients_reach_the_student_logits_and_never_the_teacher():
    torch.manual_seed(2)
    z_s, z_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    inter, intra = dist_relations(z_s, z_t, 4.0)
    (inter + intra).backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0 and z_t.grad is None
    # identical distributions: both distances at their minimum (0 up to fp32 rounding, ×τ²), the gradient about 0
    # (against distances near 16 and gradients near 2.5 for these random logits)
    same = z_t.detach().clone().requires_grad_(True)
    inter, intra = dist_relations(same, z_t, 4.0)
    (inter + intra).backward()
    assert max(inter.item(), intra.item()) < 1e-3 and same.grad.abs().max().item() < 1e-3


def test_dist_trains_end_to_end_and_logs_its_terms(env, capsys):
    teacher, run = run_sweep(tiny_sweep(methods=("dist",), pair=("resnet14", "resnet8"), recipe=FEW_STEPS).plan(),
                             env)
    assert run.status == "finished", run.error
    epoch, = run.epochs
    assert {k for k in epoch if k.startswith("loss_")} == {"loss_ce", "loss_inter", "loss_intra"}
    assert all(math.isfinite(epoch[k]) for k in ("loss", "loss_inter", "loss_intra"))
    assert run.metrics["extra_params_train"] == 0 and run.provenance["method_label"] == "dist"
    assert main(["list", "methods"]) == 0
    assert "dist" in {line.split(" ")[0] for line in capsys.readouterr().out.splitlines()}  # a row of the table
