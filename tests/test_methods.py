"""The plug-in contract, vanilla KD and FitNet: loss values against hand computations, shapes, protocols."""

import math

import pytest
import torch
from conftest import method_context

from kdbench.errors import KdbenchError
from kdbench.methods import list_methods, method_class
from kdbench.methods.base import StepOutputs, kd_divergence
from kdbench.methods.fitnet import ConvReg, hint_tap
from kdbench.models import create_model, list_models
from kdbench.models.taps import feature_shapes


@pytest.fixture(scope="module")
def zoo_shapes():
    return {name: feature_shapes(create_model(name), (3, 32, 32)) for name in list_models()}


def context(student_shapes, teacher_shapes, protocol="semckd", options=None, method="kd"):
    return method_context(method, student_shapes, teacher_shapes, protocol, options, batch_size=4)


def test_registry_order_and_entry_points(monkeypatch):
    import kdbench.methods as registry

    assert list_methods()[0] == "student" and {"kd", "fitnet"} <= set(list_methods())

    class Plugin(method_class("kd")):
        name = "plugin-kd"

    class FakeEntryPoint:
        def load(self):
            return Plugin

    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()] if group == "kdbench.methods"
                        else [])
    assert method_class("plugin-kd") is Plugin


def test_kd_divergence_matches_hand_computation():
    zs = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zt = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    t = 4.0
    expected = 0.0
    for b in range(2):
        ps = [math.exp(v / t) for v in zs[b].tolist()]
        pt = [math.exp(v / t) for v in zt[b].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        expected += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    expected *= t * t / 2
    assert kd_divergence(zs, zt, t).item() == pytest.approx(expected, rel=1e-6)
    assert kd_divergence(zt, zt).item() == pytest.approx(0.0, abs=1e-7)
    # computed in fp32 whatever the logits' dtype
    assert kd_divergence(zs.bfloat16(), zt.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("protocol, weights", [("crd", (0.1, 0.9)), ("semckd", (1.0, 1.0))])
def test_kd_weights_follow_the_protocol(protocol, weights):
    torch.manual_seed(0)
    zs, zt, y = torch.randn(4, 100), torch.randn(4, 100), torch.randint(0, 100, (4,))
    kd = method_class("kd")(context({}, {}, protocol))
    terms = kd.losses(StepOutputs(y, zs, {}, zt, {}))
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(weights[0] * torch.nn.functional.cross_entropy(zs, y).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(weights[1] * kd_divergence(zs, zt).item(), rel=1e-6)
    hot = method_class("kd")(context({}, {}, protocol, {"temperature": "2"}))
    assert hot.losses(StepOutputs(y, zs, {}, zt, {}))["kd"].item() == pytest.approx(
        weights[1] * kd_divergence(zs, zt, 2.0).item(), rel=1e-6)


def test_options_are_validated_and_typed():
    fitnet = method_class("fitnet")
    assert dict(fitnet.resolve_options({}))["hint_layer"] == 2
    assert dict(fitnet.resolve_options({"hint_layer": "1"}))["hint_layer"] == 1
    with pytest.raises(KdbenchError, match="method fitnet has no option 'layer'; its options: ce_weight, kd_weight, "
                                           "temperature, kl_reduction, hint_layer, beta"):
        fitnet.resolve_options({"layer": "1"})
    with pytest.raises(KdbenchError, match="option fitnet.kl_reduction is one of batchmean, mean; got 'sum'"):
        fitnet.resolve_options({"kl_reduction": "sum"})
    with pytest.raises(KdbenchError, match="option fitnet.hint_layer takes a int, got 'two'"):
        fitnet.resolve_options({"hint_layer": "two"})


# Regressor parameter counts at hint layer 2, methods.md §2.1 [computed]
FITNET_REGRESSORS = {
    ("vgg13", "vgg8"): ("Conv2d", 66_304), ("resnet32x4", "resnet8x4"): ("Conv2d", 16_768),
    ("wrn_40_2", "wrn_16_2"): ("Conv2d", 4_288), ("wrn_40_2", "wrn_40_1"): ("Conv2d", 2_240),
    ("resnet56", "resnet20"): ("Conv2d", 1_120), ("resnet110", "resnet32"): ("Conv2d", 1_120),
    ("resnet32x4", "ShuffleV2"): ("ConvTranspose2d", 475_520),
    ("resnet32x4", "ShuffleV1"): ("ConvTranspose2d", 983_424),
    ("wrn_40_2", "ShuffleV1"): ("ConvTranspose2d", 491_712),
    ("ResNet50", "MobileNetV2"): ("ConvTranspose2d", 132_608),
    ("vgg13", "MobileNetV2"): ("Conv2d", 4_864), ("ResNet50", "vgg8"): ("ConvTranspose2d", 2_098_688),
}


@pytest.mark.parametrize("pair", sorted(FITNET_REGRESSORS))
def test_fitnet_regressor_matches_the_reference(zoo_shapes, pair):
    teacher, student = pair
    fitnet = method_class("fitnet")(context(zoo_shapes[student], zoo_shapes[teacher], "crd", method="fitnet"))
    kind, params = FITNET_REGRESSORS[pair]
    assert type(fitnet.regressor.conv).__name__ == kind
    assert fitnet.extra_params_train() == params and fitnet.extra_params_inference() == 0


def test_fitnet_regressor_shapes_for_every_zoo_pair(zoo_shapes):
    """Every ordered pair of distinct zoo models: the regressed student hint has the (pooled) target's shape."""
    for teacher in zoo_shapes:
        for student in zoo_shapes:
            if teacher == student:
                continue
            s_shape, t_shape = zoo_shapes[student]["stage2"], zoo_shapes[teacher]["stage2"]
            reg = ConvReg(s_shape, t_shape).eval()
            out = reg(torch.zeros(1, *s_shape))
            target = reg.target(torch.zeros(1, *t_shape))
            assert out.shape == target.shape and out.shape[1] == t_shape[0], (teacher, student)


@pytest.mark.parametrize("protocol, keys, tap", [("crd", {"ce", "hint"}, "stage2"),
                                                 ("semckd", {"ce", "kd", "hint"}, "stage1")])
def test_fitnet_loss_is_weighted_mse_of_regressed_hint(zoo_shapes, protocol, keys, tap):
    torch.manual_seed(0)
    s_shapes, t_shapes = zoo_shapes["resnet8"], zoo_shapes["resnet14"]
    fitnet = method_class("fitnet")(context(s_shapes, t_shapes, protocol, method="fitnet"))
    assert fitnet.student_taps == fitnet.teacher_taps == (tap,)
    fs = torch.randn(4, *s_shapes[tap], requires_grad=True)
    ft = torch.randn(4, *t_shapes[tap])
    out = StepOutputs(torch.zeros(4, dtype=torch.long), torch.randn(4, 100, requires_grad=True), {tap: fs},
                      torch.randn(4, 100), {tap: ft})
    terms = fitnet.losses(out)
    assert set(terms) == keys
    expected = 100.0 * ((fitnet.regressor(fs) - ft) ** 2).mean()
    assert terms["hint"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["hint"].backward()
    assert fs.grad.abs().sum() > 0 and fitnet.regressor.conv.weight.grad.abs().sum() > 0


def test_fitnet_hint_layer_option_and_its_validation(zoo_shapes):
    s, t = zoo_shapes["resnet8"], zoo_shapes["resnet14"]
    assert method_class("fitnet")(context(s, t, options={"hint_layer": "3"}, method="fitnet")).student_taps == (
        "stage3",)
    assert hint_tap(0) == "stem"
    with pytest.raises(KdbenchError, match="fitnet.hint_layer=7 is not a feature of both models"):
        method_class("fitnet")(context(s, t, options={"hint_layer": "7"}, method="fitnet"))


# ----------------------------------------------------------------------------------------- protocols are presets
# protocol -> method -> (ce_weight, kd_weight, temperature, kl_reduction) and its own settings (methods.md §0.3)
PRESETS = {
    "crd": {"kd": (0.1, 0.9, 4.0, "batchmean", {}), "takd": (0.1, 0.9, 4.0, "batchmean", {}),
            "dgkd": (0.1, 0.9, 4.0, "batchmean", {}), "fitnet": (1.0, 0.0, 4.0, "batchmean", {"hint_layer": 2}),
            "semckd": (1.0, 0.0, 4.0, "batchmean", {"beta": 400.0}), "sakd": (1.0, 0.0, 4.0, "batchmean", {}),
            "letkd1": (1.0, 0.0, 4.0, "batchmean", {}), "letkd2": (1.0, 0.0, 4.0, "batchmean", {})},
    "semckd": {"kd": (1.0, 1.0, 4.0, "batchmean", {}), "takd": (1.0, 1.0, 4.0, "batchmean", {}),
               "dgkd": (1.0, 1.0, 4.0, "batchmean", {}), "fitnet": (1.0, 1.0, 4.0, "batchmean", {"hint_layer": 1}),
               "semckd": (1.0, 1.0, 4.0, "batchmean", {"beta": 400.0}), "sakd": (1.0, 1.0, 4.0, "batchmean", {}),
               "letkd1": (1.0, 1.0, 4.0, "batchmean", {}), "letkd2": (1.0, 1.0, 4.0, "batchmean", {})},
    # RepDistiller for kd and fitnet, the TAKD/DGKD code (λ = 1, τ = 5, nn.KLDivLoss mean), SemCKD's scripts,
    # letKD's configs (no logit KD), SAKD's reconstruction in its crd form
    "official": {"kd": (0.1, 0.9, 4.0, "batchmean", {}), "takd": (0.0, 1.0, 5.0, "mean", {}),
                 "dgkd": (0.0, 1.0, 5.0, "mean", {"drop_mode": "exact_k", "drop_k": 1, "ce_scale": "code"}),
                 "fitnet": (1.0, 0.0, 4.0, "batchmean", {"hint_layer": 2, "beta": 100.0}),
                 "semckd": (1.0, 1.0, 4.0, "batchmean", {"beta": 400.0}), "sakd": (1.0, 0.0, 4.0, "batchmean", {}),
                 "letkd1": (1.0, 0.0, 4.0, "batchmean", {}), "letkd2": (1.0, 0.0, 4.0, "batchmean", {})},
}
# The method zoo (RepDistiller and mdistiller): CE + β·L under crd and official (RepDistiller's scripts), plus KD_4
# under semckd (SemCKD's scripts); per-pair values at resnet56 -> resnet20 (ReviewKD 0.6, DKD β 2). DKD, DIST and
# SimKD keep their own objectives (CE + warm-up·DKD, CE + DIST, SimKD's MSE alone) under every protocol.
_ZOO_OWN = {"at": {"beta": 1000.0, "p": 2}, "sp": {"beta": 3000.0}, "nst": {"beta": 50.0},
            "kdsvd": {"beta": 1.0, "k": 1, "layout": "repdistiller"}, "cc": {"beta": 0.02},
            "vid": {"beta": 1.0, "learn_variance": True},
            "rkd": {"beta": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}, "pkt": {"beta": 30000.0},
            "crd": {"beta": 0.8, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "feat_dim": 128},
            "reviewkd": {"beta": 0.6, "warmup_epochs": 20}, "ofd": {"beta": 0.001},
            "ab": {"init_epochs": 30, "margin": 1.0}, "ft": {"beta": 200.0, "init_epochs": 30},
            "fsp": {"init_epochs": 30}}
for _protocol, _rows in PRESETS.items():
    _rows.update({m: (1.0, float(_protocol == "semckd"), 4.0, "batchmean", own) for m, own in _ZOO_OWN.items()})
    _rows["dkd"] = (1.0, 0.0, 4.0, "batchmean", {"alpha": 1.0, "beta": 2.0, "warmup_epochs": 20})
    _rows["dist"] = (1.0, 0.0, 4.0, "batchmean", {"beta": 2.0, "gamma": 2.0})  # CE + 2·DIST(1, 1, τ 4)
    _rows["simkd"] = (0.0, 0.0, 4.0, "batchmean", {"beta": 1.0, "factor": 2})  # the MSE alone (-c 0 -d 0 -b 1)
    _rows["catkd"] = (1.0, 0.0, 4.0, "batchmean", {"beta": 0.7, "cam_resolution": 2, "normalize": False})  # config
    _rows["ctkd"] = ((1.0, 1.0) if _protocol == "semckd" else (0.1, 0.9)) + (4.0, "batchmean", {
        "t_start": 1.0, "t_range": 20.0, "lambda_max": 0.0, "lambda_min": -1.0, "lambda_epochs": 10})  # KD's weights
    _rows["kd_dot"] = _rows["kd"][:4] + ({"delta": 0.075},)  # KD's loss, DOT's update
    _rows["mlkd"] = (0.1, 0.9, 4.0, "batchmean", {})  # mdistiller's KD config under every protocol
    # logit standardisation: the README's settings under every protocol; resnet56 -> resnet20's log for dkd_ls
    _rows["kd_ls"] = (0.1, 9.0, 2.0, "batchmean", {})
    _rows["dkd_ls"] = (1.0, 0.0, 3.0, "batchmean", {"alpha": 18.0, "beta": 36.0, "warmup_epochs": 20})
    _rows["ctkd_ls"] = (0.1, 9.0, 4.0, "batchmean", {"t_start": 1.0, "t_range": 20.0, "lambda_epochs": 10})
    _rows["mlkd_ls"] = (0.1, 9.0, 2.0, "batchmean", {})


@pytest.mark.parametrize("protocol", sorted(PRESETS))
def test_each_protocol_resolves_every_methods_weights(protocol):
    from kdbench.spec import PROTOCOLS

    assert set(PRESETS) == set(PROTOCOLS)
    distillers = [m for m in list_methods()  # shipped ones: other tests register plug-ins
                  if method_class(m).needs_teacher and method_class(m).__module__.startswith("kdbench.methods.")]
    assert sorted(PRESETS[protocol]) == sorted(distillers)  # a new method needs its row here
    for method, (ce, kd, temperature, reduction, own) in PRESETS[protocol].items():
        options = dict(method_class(method).resolve_options({}, protocol, "resnet56", "resnet20"))
        assert (options["ce_weight"], options["kd_weight"], options["temperature"], options["kl_reduction"]) == (
            ce, kd, temperature, reduction), (protocol, method)
        assert own.items() <= options.items(), (protocol, method)
        # the user's --set wins over the preset
        assert dict(method_class(method).resolve_options({"kd_weight": "0.25"}, protocol))["kd_weight"] == 0.25


def test_labels_say_when_logit_kd_is_added():
    for method, label in (("fitnet", "fitnet (+KD)"), ("kd", "kd"), ("dgkd", "dgkd"), ("student", "student")):
        cls = method_class(method)
        assert cls.label(dict(cls.resolve_options({}, "semckd"))) == label
    fitnet = method_class("fitnet")
    assert fitnet.label(dict(fitnet.resolve_options({}, "crd"))) == "fitnet"


def test_kl_mean_reduction_divides_by_the_classes_and_zero_weights_drop_terms():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert kd_divergence(zs, zt, 5.0, "mean").item() == pytest.approx(kd_divergence(zs, zt, 5.0).item() / 10)
    # the TAKD code's loss: (1 - λ)·CE + λ·τ²·nn.KLDivLoss()(log σ(z_s/τ), σ(z_t/τ)), at λ = 1, τ = 5
    log_p_s, p_t = torch.log_softmax(zs / 5, 1), torch.softmax(zt / 5, 1)
    official = torch.nn.functional.kl_div(log_p_s, p_t, reduction="none").mean() * 25  # nn.KLDivLoss()
    takd = method_class("takd")(context({}, {}, "official", method="takd"))
    terms = takd.losses(StepOutputs(y, zs, {}, zt, {}))
    assert set(terms) == {"kd"} and terms["kd"].item() == pytest.approx(official.item(), rel=1e-5)
