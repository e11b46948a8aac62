"""The committed reference result set (`make reference`) is complete, and the README shows its report verbatim."""

import re
from pathlib import Path

import pandas as pd
import pytest

from kdbench import report

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference-fashion-mnist-short"
PAIRS = {"resnet56->resnet20", "vgg13->vgg8"}
# The methods the smoke set was made with: those before the RepDistiller/mdistiller zoo, which joins in the cpu set.
METHODS = ("kd", "fitnet", "semckd", "takd", "dgkd", "sakd", "letkd1", "letkd2")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return report.load_results(REFERENCE)


def test_every_method_of_the_set_on_both_pairs_with_two_seeds(table):
    runs = table.drop_duplicates("run_id")
    assert set(runs.dataset) == {"fashion-mnist"} and set(runs.recipe) == {"short"}
    finished = runs[runs.status == "finished"]
    distilled = finished[finished.role.eq("student") & finished.pair.notna()]
    for method in METHODS:
        for pair in PAIRS:
            seeds = set(distilled.loc[(distilled.method == method) & (distilled.pair == pair), "seed"])
            assert seeds == {0, 1}, (method, pair, seeds)
    baseline = finished[finished.method.eq("student") & finished.role.eq("student")]
    assert {(s, seed) for s, seed in zip(baseline.student, baseline.seed)} == {
        (s, seed) for s in ("resnet20", "vgg8") for seed in (0, 1)}
    # every run that did not finish says why
    assert runs.loc[runs.status != "finished", "error"].str.len().gt(0).all()


def test_readme_shows_the_report_of_the_committed_set():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- reference-report:start -->\n(.*?)<!-- reference-report:end -->", readme, re.S)
    assert block, "README.md lacks the reference-report markers"
    text, _ = report.report(REFERENCE)
    assert block.group(1).strip() == text.strip(), "README is stale: paste `kdbench report --results-dir " \
        "results/reference-fashion-mnist-short` between the reference-report markers"
