"""Logit standardisation (methods/ls.py): the z-score, its invariances, each host's loss on standardised logits
against hand computations, the official settings per pair, and a run through the harness."""

import math

import pytest
import torch
from conftest import method_context, tiny_sweep
from test_zoo_e2e import FEW_STEPS

from kdbench.harness import run_sweep
from kdbench.methods import method_class
from kdbench.methods.base import StepOutputs
from kdbench.methods.dkd import dkd_divergences
from kdbench.methods.ls import standardize
from kdbench.methods.mlkd import batch_correlation, class_correlation, instance_kd

LS_METHODS = ("kd_ls", "dkd_ls", "ctkd_ls", "mlkd_ls")


def _built(method, pair=("resnet56", "resnet20"), epochs=240):
    cls = method_class(method)
    options = dict(cls.resolve_options({}, "official", *pair, epochs))
    return cls(method_context(method, {}, {}, "official", options, batch_size=4))


def _step(z_s, z_t, labels, epoch=0):
    return StepOutputs(labels=labels, student_logits=z_s, student_features={}, teacher_logits=z_t, epoch=epoch)


def test_standardize_z_scores_each_row_with_the_unbiased_std():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    for row, out in zip(z.tolist(), standardize(z).tolist()):
        mean = sum(row) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / 3)  # n − 1
        assert out == pytest.approx([(v - mean) / (std + 1e-7) for v in row], rel=1e-6)
    assert standardize(z.half()).dtype == torch.float32


def test_kd_ls_is_a_tenth_of_ce_on_raw_logits_plus_9_kd_at_tau_2_on_standardised_ones():
    z_s, z_t = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]]), torch.tensor([[4.0, 0.0, 1.0], [1.0, 2.0, -2.0]])
    y = torch.tensor([0, 2])
    terms = _built("kd_ls").losses(_step(z_s, z_t, y))

    def softmax(row, tau):
        exps = [math.exp(v / tau) for v in row]
        return [e / sum(exps) for e in exps]

    def zscore(row):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        return [(v - mean) / std for v in row]

    ce = -sum(math.log(softmax(r, 1.0)[c]) for r, c in zip(z_s.tolist(), y.tolist())) / 2
    kl = sum(sum(p * math.log(p / q) for p, q in zip(softmax(zscore(t), 2.0), softmax(zscore(s), 2.0)))
             for s, t in zip(z_s.tolist(), z_t.tolist())) / 2
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(0.1 * ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(9 * 4 * kl, rel=1e-5)


@pytest.mark.parametrize("method", ("kd_ls", "dkd_ls", "ctkd_ls"))  # mlkd_ls's class and batch terms see raw logits
def test_the_distillation_terms_ignore_the_logits_scale_and_shift_but_ce_does_not(method):
    """What standardisation buys: the student matches the teacher's logit relations, not their range."""
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    model = _built(method)
    base = model.losses(_step(z_s, z_t, y, epoch=30))
    moved = model.losses(_step(3.0 * z_s + 5.0, 0.5 * z_t - 2.0, y, epoch=30))
    for term in set(base) - {"ce"}:
        assert moved[term].item() == pytest.approx(base[term].item(), rel=1e-4), term
    assert moved["ce"].item() != pytest.approx(base["ce"].item(), rel=1e-2)


def test_dkd_ls_is_dkd_on_standardised_logits_with_the_pairs_scaled_weights():
    """resnet56 -> resnet20's log: τ 3, weight 18, β 2, so α 18 and β 36; mdistiller's warm-up at epoch 5 is 5/20."""
    torch.manual_seed(1)
    z_s, z_t, y = torch.randn(5, 8), torch.randn(5, 8), torch.randint(0, 8, (5,))
    terms = _built("dkd_ls").losses(_step(z_s, z_t, y, epoch=4))
    tckd, nckd = dkd_divergences(standardize(z_s), standardize(z_t), y, 3.0)
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(0.25 * 18 * tckd.item(), rel=1e-6)
    assert terms["nckd"].item() == pytest.approx(0.25 * 36 * nckd.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(z_s, y).item(), rel=1e-6)


def test_ctkd_ls_learns_its_temperature_on_standardised_logits():
    torch.manual_seed(2)
    z_s, z_t, y = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6), torch.randint(0, 6, (4,))
    ls, plain = _built("ctkd_ls"), _built("ctkd")
    terms = ls.losses(_step(z_s, z_t, y, epoch=4))
    reference = plain.losses(_step(standardize(z_s), standardize(z_t), y, epoch=4))
    assert terms["kd"].item() == pytest.approx(9 / 0.9 * reference["kd"].item(), rel=1e-6)  # CTKD's own is 0.9·KD
    assert terms["ce"].item() == pytest.approx(0.1 * torch.nn.functional.cross_entropy(z_s, y).item(), rel=1e-6)
    terms["kd"].backward()
    assert ls.global_t.grad is not None and ls.global_t.grad.item() != 0.0


def test_mlkd_ls_standardises_the_instance_terms_only_and_masks_on_the_raw_teacher():
    """The official MLKD.py passes ``logit_stand`` to ``kd_loss`` alone: the class and batch correlations, the
    confidence masks and CE see the raw logits. Weight 9 at base τ 2, so the temperatures are (2, 3, 5, 2, 6)."""
    torch.manual_seed(3)
    weak_s, strong_s, strong_t = 3 * torch.randn(4, 5), 3 * torch.randn(4, 5), 3 * torch.randn(4, 5)
    weak_t = torch.tensor([[9.0, 0, 0, 0, 0], [0, 8.0, 0, 0, 0], [0, 0, 0.5, 0, 0], [0, 0, 0, 0.2, 0]])
    labels = torch.tensor([0, 1, 2, 3])
    terms = _built("mlkd_ls").losses(StepOutputs(labels=labels, student_logits=weak_s, student_features={},
                                                 teacher_logits=weak_t, views={"strong": (strong_s, strong_t)}))
    temps, w, f = (2.0, 3.0, 5.0, 2.0, 6.0), 9.0, 0.5  # two of the four raw teacher rows are at most the median
    (zw_s, zw_t, zs_s, zs_t) = map(standardize, (weak_s, weak_t, strong_s, strong_t))
    kd = (w * f * sum(instance_kd(zw_s, zw_t, t) for t in temps)
          + w * sum(instance_kd(zs_s, zs_t, t) for t in temps[:3])
          + w * sum(instance_kd(zw_s, zw_t, t) for t in temps[3:]))
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert terms["bc"].item() == pytest.approx(w * f * sum(batch_correlation(weak_s, weak_t, t) for t in temps).item(),
                                               rel=1e-6)
    classes = 3 / 5  # summed confidence per class: three of the five at most their median
    assert terms["cc"].item() == pytest.approx(
        w * classes * sum(class_correlation(weak_s, weak_t, t) for t in temps).item(), rel=1e-6)
    ce = torch.nn.functional.cross_entropy
    assert terms["ce"].item() == pytest.approx(0.1 * (ce(weak_s, labels) + ce(strong_s, labels)).item(), rel=1e-6)


@pytest.mark.parametrize("method, pair, expected", [
    ("kd_ls", ("resnet56", "resnet20"), {"ce_weight": 0.1, "kd_weight": 9.0, "temperature": 2.0}),
    ("kd_ls", ("vgg13", "vgg8"), {"kd_weight": 9.0, "temperature": 3.0}),
    ("kd_ls", ("resnet110", "resnet20"), {"kd_weight": 12.0, "temperature": 4.0}),
    ("kd_ls", ("ResNet50", "MobileNetV2"), {"kd_weight": 1.0, "temperature": 3.0}),
    ("dkd_ls", ("resnet56", "resnet20"), {"ce_weight": 1.0, "temperature": 3.0, "alpha": 18.0, "beta": 36.0}),
    ("dkd_ls", ("vgg13", "vgg8"), {"temperature": 2.0, "alpha": 15.0, "beta": 30.0}),
    ("dkd_ls", ("resnet32x4", "resnet8x4"), {"temperature": 2.0, "alpha": 9.0, "beta": 72.0}),  # config β 8
    ("dkd_ls", ("resnet14", "resnet8"), {"temperature": 2.0, "alpha": 9.0, "beta": 72.0}),  # no log: the defaults
    ("ctkd_ls", ("vgg13", "vgg8"), {"ce_weight": 0.1, "kd_weight": 9.0, "t_start": 1.0, "t_range": 20.0}),
    ("mlkd_ls", ("resnet56", "resnet20"), {"ce_weight": 0.1, "kd_weight": 9.0, "temperature": 2.0}),
    ("mlkd_ls", ("vgg13", "vgg8"), {"ce_weight": 0.1, "kd_weight": 6.0, "temperature": 2.0}),
])
def test_official_settings_per_pair_come_from_the_readmes_logs(method, pair, expected):
    for protocol in ("official", "crd", "semckd"):  # one objective under every protocol
        options = dict(method_class(method).resolve_options({}, protocol, *pair))
        assert expected.items() <= options.items(), protocol
    overridden = dict(method_class(method).resolve_options({"kd_weight": "2"}, "official", *pair))
    assert overridden["kd_weight"] == 2.0


def test_every_ls_method_trains_end_to_end(env):
    teacher, *runs = run_sweep(tiny_sweep(methods=LS_METHODS, pair=("resnet14", "resnet8"), recipe=FEW_STEPS).plan(),
                               env)
    assert [r.spec.method for r in runs] == list(LS_METHODS)
    for run in runs:
        assert run.status == "finished", (run.spec.method, run.error)
        assert math.isfinite(run.epochs[0]["loss"])
    assert {k for k in runs[1].epochs[0] if k.startswith("loss_")} == {"loss_ce", "loss_tckd", "loss_nckd"}
