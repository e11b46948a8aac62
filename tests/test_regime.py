"""The regime checks (kdbench report --layout regime): measured on the first CPU set, whose students did not converge,
and on a table built to meet every criterion."""

import io
from pathlib import Path

import pandas as pd
import pytest

from kdbench import report
from kdbench.cli import main

V1 = Path(__file__).resolve().parents[1] / "results" / "reference-fashion-mnist-cpu-v1"


@pytest.fixture(scope="module")
def v1_frame():
    return report.entries(report.load_results(V1))


def test_the_first_cpu_set_fails_on_seed_spread_and_its_test_subset(v1_frame):
    checks = report.regime(v1_frame, "top1_best").set_index("pair")
    table = report.load_results(V1)
    runs = report.runs(table)
    curves = table[table.metric.eq("top1") & table.epoch.notna()].sort_values("epoch")
    rise = curves.groupby("run_id")["value"].agg(lambda v: v.iloc[-1] - v.iloc[-2])
    for pair, student in (("resnet56->resnet20", "resnet20"), ("vgg13->vgg8", "vgg8")):
        ce = runs[(runs.role == "student") & (runs.method == "student") & (runs.student == student)]
        kd = runs[(runs.method == "kd") & (runs.pair == pair)]
        teacher = runs[(runs.role == "teacher") & (runs.student == pair.split("->")[0])]
        row = checks.loc[pair]
        assert row.ce_std == pytest.approx(ce.top1_best.std(ddof=1))
        assert row.teacher_minus_ce == pytest.approx(teacher.top1_best.mean() - ce.top1_best.mean())
        assert row.kd_best_minus_last == pytest.approx((kd.top1_best - kd.top1_last).mean())
        at_last = pd.concat([ce, kd]).query("top1_best_epoch == 6")
        assert row.best_at_last == len(at_last) > 0
        assert row.best_at_last_rise == pytest.approx(rise[at_last.run_id].mean())
        assert row.test_images == 2000 and not row.meets_subset_runs and row.meets_teacher_minus_ce
    assert checks.loc["resnet56->resnet20", "ce_std"] == pytest.approx(4.60, abs=0.005)
    assert not checks.loc["resnet56->resnet20", "meets_ce_std"]
    assert checks.loc["vgg13->vgg8", "meets_ce_std"]


def test_a_converged_table_meets_every_criterion(v1_frame):
    table = v1_frame[v1_frame.pair == "vgg13->vgg8"].copy()
    table["test_subset"] = None  # as if evaluated on the whole test set
    checks = report.regime(table, "top1_best")
    assert checks.filter(like="meets_").iloc[0].map(bool).tolist() == [True] * len(report.CRITERIA)
    text = "\n".join(report.render_regime(checks, "github"))
    assert "| all " in text or "|   all |" in text
    # no KD run: its criterion cannot be measured, and the table does not pass
    no_kd = report.regime(table[table.method != "kd"], "top1_best")
    assert no_kd.meets_kd_best_minus_last.iloc[0] is None
    assert "n/a" in "\n".join(report.render_regime(no_kd, "github"))


def test_the_cli_prints_the_checks(capsys):
    assert main(["report", "--results-dir", str(V1), "--layout", "regime", "--format", "csv"]) == 0
    checks = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert set(checks.pair) == {"resnet56->resnet20", "vgg13->vgg8"} and not checks.meets_subset_runs.any()
