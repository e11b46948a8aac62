"""`kdbench report` and kdbench.report on a real tiny results table (synthetic data, CPU, a few seconds)."""

from pathlib import Path

import pandas as pd
import probe_methods  # noqa: F401  (registers probe-nan: a run that fails, for the footnote)
import pytest
from conftest import tiny_sweep

from kdbench import report
from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.harness import RunEnv, run_sweep
from kdbench.results import ResultsStore

PUBLISHED = Path(__file__).resolve().parents[1] / "results" / "published_cifar100.csv"
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory) -> Path:
    """A teacher, CE students and kd students over seeds 0 and 1, plus a failing run; built once per session
    (test_notebook.py shares it)."""
    if "root" not in _BUILT:
        root = tmp_path_factory.mktemp("report") / "results"
        sweep = tiny_sweep(methods=("student", "kd", "probe-nan"), seeds=(0, 1))
        run_sweep(sweep.plan(), RunEnv(ResultsStore(root), progress=False))
        _BUILT["root"] = root
    return _BUILT["root"]


@pytest.fixture(scope="module")
def table(tiny_results) -> pd.DataFrame:
    return report.load_results(tiny_results)


def _level(table: pd.DataFrame, method: str, metric: str) -> pd.Series:
    rows = table[(table.method == method) & (table.role == "student") & (table.metric == metric)
                 & table.epoch.isna() & (table.status == "finished")]
    return rows.set_index("seed")["value"].sort_index()


def _report(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["report", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_leaderboard_aggregates_seeds_and_pairs_delta_by_seed(table):
    board = report.leaderboard(report.entries(table), "top1_best")
    rows = board.set_index("label")
    assert list(board.kind) == ["teacher", "student", "method"] and set(board.pair) == {"resnet14->resnet8"}
    base, kd = _level(table, "student", "top1_best"), _level(table, "kd", "top1_best")
    assert rows.loc["student (CE)", "n"] == 2 and rows.loc["kd", "n"] == 2 and rows.loc["teacher", "n"] == 1
    assert rows.loc["student (CE)", "mean"] == pytest.approx(base.mean())
    assert rows.loc["student (CE)", "std"] == pytest.approx(base.std(ddof=1))
    assert rows.loc["kd", "delta"] == pytest.approx((kd - base).mean())
    assert rows.loc["kd", "delta_std"] == pytest.approx((kd - base).std(ddof=1))
    assert rows.loc["kd", "delta_paired"] and rows.loc["kd", "delta_n"] == 2
    # costs: the distillation run's end-to-end time includes its teacher; a CE run's is its own wall time
    assert rows.loc["kd", "end_to_end_s"] == pytest.approx(_level(table, "kd", "end_to_end_wall_s").mean())
    assert rows.loc["student (CE)", "end_to_end_s"] == pytest.approx(_level(table, "student", "wall_s").mean())
    assert rows.loc["kd", "peak_bytes"] == pytest.approx(_level(table, "kd", "cpu_peak_rss_bytes").mean())
    assert rows.loc["kd", "inference_params"] == rows.loc["student (CE)", "inference_params"] > 0
    assert "probe-nan" not in set(board.method)  # failed runs are not counted


def test_cli_report_states_its_rule_and_footnotes_failed_runs(capsys, tiny_results):
    code, out, err = _report(capsys, "--results-dir", str(tiny_results))
    assert code == 0 and err == ""
    assert "Top-1 = top1_best (the best epoch of each run), mean ± sample std (ddof = 1)" in out
    assert "### resnet14->resnet8 · synthetic · recipe tiny (3 epochs, batch 32) · cpu" in out
    assert "protocol semckd" in out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"model", "teacher resnet14", "student resnet8 (CE)", "kd"} <= set(lines)
    for header in ("n", "top1_best %", "Δ vs student", "train img/s", "peak RSS MiB", "extra train params",
                   "inference params", "end-to-end"):
        assert f" {header} " in lines["model"]
    assert " ± " in lines["kd"] and "published" not in lines["model"]
    assert "No published column: the published numbers are CIFAR-100 results (this table: synthetic)" in out
    assert "Not counted (2 runs did not finish)" in out and "non-finite training loss" in out

    code, last, _ = _report(capsys, "--results-dir", str(tiny_results), "--metric", "top1_last", "--by", "setting")
    assert code == 0 and "Top-1 = top1_last (the last epoch" in last and "| pair " in last


@pytest.mark.parametrize("fmt, marker", [("markdown", "|:---"), ("latex", "\\begin{tabular}"),
                                         ("html", "<table>"), ("csv", "setting,protocol,pair,kind,label")])
def test_formats(capsys, tiny_results, tmp_path, fmt, marker):
    out_file = tmp_path / "board.txt"
    code, out, _ = _report(capsys, "--results-dir", str(tiny_results), "--format", fmt, "--out", str(out_file))
    assert code == 0 and out == "" and marker in out_file.read_text()
    if fmt == "csv":
        board = pd.read_csv(out_file)
        assert set(board.label) == {"teacher", "student (CE)", "kd"} and (board.metric == "top1_best").all()


def _as_cifar100(table: pd.DataFrame) -> pd.DataFrame:
    """The tiny table relabelled as a CIFAR-100 resnet56 -> resnet20 sweep under the crd protocol."""
    table = table.copy()
    names = {"resnet14": "resnet56", "resnet8": "resnet20", "resnet14->resnet8": "resnet56->resnet20"}
    for column in ("teacher", "student", "pair"):
        table[column] = table[column].replace(names)
    table["dataset"] = "cifar100"
    table.loc[table.protocol == "semckd", "protocol"] = "crd"
    return table


def test_published_numbers_match_pair_method_protocol_and_mark_other_rules(table):
    frame = report.entries(_as_cifar100(table))
    published = report.load_published(PUBLISHED)
    best = report.leaderboard(frame, "top1_best", published).set_index("label")
    last = report.leaderboard(frame, "top1_last", published).set_index("label")
    # CRD Table 1 reports the last epoch: shown as such next to top1_best, plainly next to top1_last
    assert best.loc["kd", "published"] == "70.66 [last]" and last.loc["kd", "published"] == "70.66"
    assert "CRD (Tian et al. ICLR 2020) Table 1" in last.loc["kd", "published_source"]
    assert last.loc["teacher", "published"] == "72.34" and last.loc["student (CE)", "published"] == "69.06"
    text = report.render_report(report.leaderboard(frame, "top1_last", published))
    assert "published %" in text and "No published column" not in text


def test_runs_of_different_settings_are_never_pooled(tmp_path, table):
    other = table.copy()
    other["run_id"] += "-gpu"
    other["device"], other["device_name"] = "cuda", "NVIDIA H100"
    both = pd.concat([table, other], ignore_index=True)
    board = report.leaderboard(report.entries(both), "top1_best")
    assert board.setting.nunique() == 2 and set(board.n) == {1, 2}  # n stays per setting
    assert report.render_report(board).count("### resnet14->resnet8") == 2
    assert board.setting.str.contains("NVIDIA H100").any()


def test_option_sets_and_chains_are_labelled_by_what_differs(table):
    kd = table[table.method == "kd"]
    other = kd.assign(run_id=kd.run_id + "-t2", method_options=kd.method_options.str.replace(
        "temperature=4.0", "temperature=2.0"))
    board = report.leaderboard(report.entries(pd.concat([table, other], ignore_index=True)), "top1_best")
    assert set(board.label) == {"teacher", "student (CE)", "kd[temperature=4.0]", "kd[temperature=2.0]"}
    assert set(board.n) == {1, 2}  # two option sets: never pooled

    # a lone option set away from the defaults is named too, and so are failed runs of one
    assert (kd.method_overrides == "").all()
    changed = other.assign(method_overrides="temperature=2.0")
    changed.loc[changed.seed == 1, "status"] = "failed"
    alone = pd.concat([table[table.method != "kd"], changed], ignore_index=True)
    assert set(report.leaderboard(report.entries(alone), "top1_best").label) == {
        "teacher", "student (CE)", "kd[temperature=2.0]"}
    assert "kd[temperature=2.0] resnet14->resnet8 seed 1: failed" in report._describe(report.unfinished(alone))

    chained = other.assign(method_options=kd.method_options.values, assistants="resnet12:resnet10")
    board = report.leaderboard(report.entries(pd.concat([table, chained], ignore_index=True)), "top1_best")
    assert set(board.label) == {"teacher", "student (CE)", "kd", "kd via resnet12:resnet10"}


def test_filters(table):
    frame = report.entries(table, methods="student", pairs="resnet14:resnet8", dataset="synthetic")
    assert set(frame.kind) == {"teacher", "student"}
    with pytest.raises(KdbenchError, match="no finished run matches --methods fitnet; the results hold: kd"):
        report.entries(table, methods="fitnet")


def test_paired_comparison_over_seeds(table):
    per_seed, summary = report.paired_comparison(report.entries(table), "kd", "student", "top1_best")
    base, kd = _level(table, "student", "top1_best"), _level(table, "kd", "top1_best")
    assert list(per_seed.seed) == [0, 1]
    assert list(per_seed.difference) == pytest.approx(list(kd - base))
    assert summary["n"] == 2 and summary["mean"] == pytest.approx((kd - base).mean())
    stats = pytest.importorskip("scipy.stats")
    assert summary["p"] == pytest.approx(stats.ttest_rel(kd, base).pvalue)


def test_plots_are_written_as_png_and_svg(tmp_path, table):
    written = report.save_plots(report.entries(table), table, tmp_path / "plots")
    names = {p.name for p in written}
    for plot in ("accuracy_vs_throughput", "top1", "delta", "memory", "learning_curves", "heatmap"):
        assert {f"{plot}.png", f"{plot}.svg"} <= names
    assert all(p.stat().st_size > 1000 for p in written)


def _one_line_error(capsys, *argv: str) -> str:
    code, out, err = _report(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("kdbench: error: ")
    return err


def test_clear_errors(capsys, tmp_path, tiny_results):
    assert "does not exist" in _one_line_error(capsys, "--results-dir", str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no metrics.parquet" in _one_line_error(capsys, "--results-dir", str(empty))
    ResultsStore(empty).rebuild_table()  # an all-runs table with no runs in it
    assert "holds no runs" in _one_line_error(capsys, "--results-dir", str(empty))

    old = tmp_path / "old"
    old.mkdir()
    pd.read_parquet(tiny_results / "metrics.parquet").drop(columns=["protocol"]).to_parquet(old / "metrics.parquet")
    assert "lacks column(s) protocol: it was written by an older kdbench" in _one_line_error(
        capsys, "--results-dir", str(old))

    results = str(tiny_results)
    assert "no finished run matches --methods fitnet" in _one_line_error(
        capsys, "--results-dir", results, "--methods", "fitnet")
    assert "no finished run matches --pairs vgg13->vgg8" in _one_line_error(
        capsys, "--results-dir", results, "--pairs", "vgg13:vgg8")
    assert "argument --metric: invalid choice: 'top5'" in _one_line_error(
        capsys, "--results-dir", results, "--metric", "top5")
