"""MLKD (methods/mlkd.py) and the augmented views it needs (Method.views, DeviceLoader's strong view): each level's
term against a hand computation, the code's masks, the views' replayability, and a run through the harness."""

import math

import numpy as np
import pytest
import torch
from conftest import method_context, tiny_sweep
from test_zoo_e2e import FEW_STEPS

from kdbench.errors import KdbenchError
from kdbench.harness import run_sweep
from kdbench.loader import DeviceLoader
from kdbench.methods import method_class
from kdbench.methods.base import StepOutputs
from kdbench.methods.mlkd import at_most_median, batch_correlation, class_correlation, instance_kd

MLKD = method_class("mlkd")


def _softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_each_level_matches_a_hand_computation():
    s, t = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]), torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    temp = 2.0
    p_s = [_softmax(r, temp) for r in s.tolist()]
    p_t = [_softmax(r, temp) for r in t.tolist()]
    kl = sum(sum(a * math.log(a / b) for a, b in zip(pt, ps)) for pt, ps in zip(p_t, p_s)) / 2
    assert instance_kd(s, t, temp).item() == pytest.approx(temp**2 * kl, rel=1e-5)
    cls = sum((sum(p_t[n][i] * p_t[n][j] for n in range(2)) - sum(p_s[n][i] * p_s[n][j] for n in range(2))) ** 2
              for i in range(3) for j in range(3)) / 3
    assert class_correlation(s, t, temp).item() == pytest.approx(cls, rel=1e-5)
    batch = sum((sum(a * b for a, b in zip(p_t[m], p_t[n])) - sum(a * b for a, b in zip(p_s[m], p_s[n]))) ** 2
                for m in range(2) for n in range(2)) / 2
    assert batch_correlation(s, t, temp).item() == pytest.approx(batch, rel=1e-5)


@pytest.mark.parametrize("values", [[0.9, 0.2, 0.5, 0.7], [0.3, 0.3, 0.1], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
def test_at_most_median_is_numpys_percentile_rule(values):
    tensor = torch.tensor(values)
    assert at_most_median(tensor).item() == pytest.approx(np.mean(np.array(values) <= np.percentile(values, 50)))


def test_the_masks_scale_whole_terms_by_the_masked_fraction_as_the_code_does():
    """With the weak view's teacher confident on 3 of 4 samples, the masked weak terms carry f = 2/4 (at most the
    median), not a per-sample mask; the strong group repeats the weak view at T 2 and 6."""
    torch.manual_seed(0)
    weak_s, strong_s = torch.randn(4, 5), torch.randn(4, 5)
    weak_t = torch.tensor([[9.0, 0, 0, 0, 0], [0, 8.0, 0, 0, 0], [0, 0, 0.5, 0, 0], [0, 0, 0, 0.2, 0]])
    strong_t = torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    method = MLKD(method_context("mlkd", {}, {}, "official", dict(MLKD.resolve_options({}, "official")), batch_size=4))
    terms = method.losses(StepOutputs(labels=labels, student_logits=weak_s, student_features={}, teacher_logits=weak_t,
                                      views={"strong": (strong_s, strong_t)}))
    temps, w = (4.0, 3.0, 5.0, 2.0, 6.0), 0.9
    f = 0.5
    kd = (w * f * sum(instance_kd(weak_s, weak_t, t) for t in temps)
          + w * sum(instance_kd(strong_s, strong_t, t) for t in temps[:3])
          + w * sum(instance_kd(weak_s, weak_t, t) for t in temps[3:]))
    assert set(terms) == {"ce", "kd", "cc", "bc"}
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert terms["bc"].item() == pytest.approx(w * f * sum(batch_correlation(weak_s, weak_t, t) for t in temps).item(),
                                               rel=1e-6)
    ce = torch.nn.functional.cross_entropy
    assert terms["ce"].item() == pytest.approx(0.1 * (ce(weak_s, labels) + ce(strong_s, labels)).item(), rel=1e-6)


def _loader(synthetic_data):
    return DeviceLoader(synthetic_data, "cpu", batch_size=4, train_subset=12)


@pytest.fixture
def synthetic_data():
    from kdbench.data import load_synthetic

    return load_synthetic(None, False)


def test_the_strong_view_is_replayable_and_augmented_apart_from_the_standard_one(synthetic_data):
    loader = _loader(synthetic_data)
    first = list(loader.train_epoch(3, 1, positions=True, views=("strong",)))
    again = list(loader.train_epoch(3, 1, positions=True, views=("strong",)))
    plain = list(loader.train_epoch(3, 1, positions=True))
    for (x, y, pos, views), (x2, _, _, views2), (xp, yp, posp) in zip(first, again, plain):
        assert torch.equal(views["strong"], views2["strong"])  # a pure function of (seed, epoch)
        assert torch.equal(x, xp) and torch.equal(y, yp) and torch.equal(pos, posp)  # the standard view unchanged
        assert views["strong"].shape == x.shape and not torch.equal(views["strong"], x)
    other_epoch = next(iter(loader.train_epoch(3, 2, positions=True, views=("strong",))))
    assert not torch.equal(other_epoch[3]["strong"], first[0][3]["strong"])
    with pytest.raises(KdbenchError, match="unknown augmented view"):
        next(iter(loader.train_epoch(3, 1, views=("sideways",))))


def test_mlkd_trains_end_to_end_with_two_forwards_of_each_model(env):
    teacher, run = run_sweep(tiny_sweep(methods=("mlkd",), pair=("resnet14", "resnet8"), recipe=FEW_STEPS).plan(), env)
    assert run.status == "finished", run.error
    assert {k for k in run.epochs[0] if k.startswith("loss_")} == {"loss_ce", "loss_kd", "loss_cc", "loss_bc"}
    assert math.isfinite(run.epochs[0]["loss"]) and run.metrics["frozen_forwards_per_step"] == 2
