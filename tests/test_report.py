"""`kdbench report` and kdbench.report on a real tiny results table (synthetic data, CPU, a few seconds)."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import probe_methods  # noqa: F401  (registers probe-nan: a run that fails, for the footnote)
import pytest
from conftest import tiny_sweep
from scipy import stats

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


def _with_top1(table: pd.DataFrame, method: str, values: dict[int, float]) -> pd.DataFrame:
    """``table`` with the top1_best of ``method``'s student runs set per seed."""
    table = table.copy()
    for seed, value in values.items():
        rows = (table.method == method) & (table.role == "student") & (table.seed == seed) \
            & (table.metric == "top1_best") & table.epoch.isna()
        table.loc[rows, "value"] = value
    return table


def _rows(text: str) -> dict[str, dict[str, str]]:
    """The rows of a report's github tables by model (without flag markers: a tiny run is often best at its last
    epoch, see test_flags.py), each row's cells by header."""
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ")]
    return {re.sub(r"( \[[a-z]\])+$", "", cells[0]): dict(zip(lines[0], cells)) for cells in lines
            if cells != lines[0]}


@pytest.mark.slow
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
    # costs: a distillation run's end-to-end time adds its share of the teacher (two finished kd runs learned from
    # it: half each); a CE run's is its own wall time; the teacher's row shows its full training
    own = sum(_level(table, "kd", m) for m in ("wall_s", "prepare_s", "reused_fit_s"))
    assert rows.loc["kd", "end_to_end_s"] == pytest.approx((own + _level(table, "kd", "teacher_wall_s") / 2).mean())
    assert rows.loc["kd", "end_to_end_s"] < _level(table, "kd", "end_to_end_wall_s").mean()
    assert rows.loc["student (CE)", "end_to_end_s"] == pytest.approx(_level(table, "student", "wall_s").mean())
    assert rows.loc["teacher", "end_to_end_s"] == pytest.approx(_level(table, "kd", "teacher_wall_s").iloc[0])
    assert rows.loc["kd", "peak_bytes"] == pytest.approx(_level(table, "kd", "cpu_peak_rss_bytes").mean())
    assert rows.loc["kd", "inference_params"] == rows.loc["student (CE)", "inference_params"] > 0
    assert "probe-nan" not in set(board.method)  # failed runs are not counted


def test_cli_report_states_its_rule_and_footnotes_failed_runs(capsys, tiny_results):
    code, out, err = _report(capsys, "--results-dir", str(tiny_results))
    assert code == 0 and err == ""
    first = out.splitlines()[0]
    assert first.startswith("Top-1 = top1_best of each run: selected on test (best test epoch, as CRD and DKD "
                            "report); mean ± sample std (ddof = 1)")
    assert "none of the 4 runs recorded it" in first  # the default, top1_at_best_val, needs a validation split
    assert "* = Holm-adjusted p < 0.05 over the methods of each table" in first
    assert "### resnet14->resnet8 · teacher seed 0 · synthetic · recipe tiny (3 epochs, batch 32) · cpu" in out
    assert "protocol official" in out
    rows = _rows(out)
    assert set(rows) == {"teacher resnet14 (seed 0)", "student resnet8 (CE)", "kd"}
    assert list(rows["kd"]) == ["model", "n", "top1_best %", "Δ vs student", "Δ 95 % CI", "p (Holm)", "train img/s",
                                "peak RSS MiB", "extra train params", "inference params", "end-to-end"]
    assert " ± " in rows["kd"]["Δ vs student"] and rows["kd"]["Δ 95 % CI"].startswith("[")
    assert ("No published column: the published numbers are CIFAR-100, ImageNet, Tiny-ImageNet results (this table: "
            "synthetic)") in out
    assert "Not counted (2 runs did not finish)" in out and "non-finite training loss" in out

    code, last, _ = _report(capsys, "--results-dir", str(tiny_results), "--metric", "top1_last", "--by", "setting")
    assert code == 0 and "Top-1 = top1_last of each run: the last epoch" in last and "| pair " in last
    code, bh, _ = _report(capsys, "--results-dir", str(tiny_results), "--correction", "bh")
    assert code == 0 and "Benjamini–Hochberg-adjusted p < 0.05" in bh.splitlines()[0] and "p (BH)" in _rows(bh)["kd"]


@pytest.mark.parametrize("fmt, marker", [("markdown", "|:---"), ("latex", "\\begin{tabular}"),
                                         ("html", "<table>"), ("csv", "setting,protocol,pair,kind,label")])
def test_formats(capsys, tiny_results, tmp_path, fmt, marker):
    out_file = tmp_path / "board.txt"
    code, out, _ = _report(capsys, "--results-dir", str(tiny_results), "--format", fmt, "--out", str(out_file))
    assert code == 0 and out == "" and marker in out_file.read_text()
    if fmt == "csv":
        board = pd.read_csv(out_file)
        assert set(board.label) == {"teacher", "student (CE)", "kd"} and (board.metric == "top1_best").all()
        kd = board.set_index("label").loc["kd"]
        assert kd.delta_ci_low < kd.delta < kd.delta_ci_high and board.delta_ci_low.dtype == float
        assert board.delta_excludes_zero.dtype == bool and board.delta_significant.dtype == bool
        assert kd.p_adjusted == pytest.approx(kd.p) and kd.correction == "holm"  # one method: nothing to adjust
    elif fmt == "latex":
        assert "% Top-1 = top1_best" in out_file.read_text() and "95 \\% CI" in out_file.read_text()


def _as_cifar100(table: pd.DataFrame) -> pd.DataFrame:
    """The tiny table relabelled as a CIFAR-100 resnet56 -> resnet20 sweep under the crd protocol and the paper
    recipe."""
    table = table.copy()
    names = {"resnet14": "resnet56", "resnet8": "resnet20", "resnet14->resnet8": "resnet56->resnet20"}
    for column in ("teacher", "student", "pair"):
        table[column] = table[column].replace(names)
    table["dataset"] = "cifar100"
    table.loc[table.protocol != "none", "protocol"] = "crd"
    return table.assign(recipe="paper", epochs=240, batch_size=64, train_subset=None, test_subset=None, lr=None)


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
    text = report.render_report(board)
    assert text.count("### resnet14->resnet8") == 2 and " · cuda (NVIDIA H100) · fp32" in text


def _on_gpus(table: pd.DataFrame, names: dict[int, str]) -> pd.DataFrame:
    """``table`` as CUDA runs, each seed on the GPU model ``names`` gives it (the teacher on seed 0's)."""
    return table.assign(device="cuda", device_name=table.seed.map(names))


def test_runs_that_differ_only_in_gpu_model_pool_and_show_per_device_costs(table):
    mixed = _on_gpus(table, {0: "NVIDIA H100", 1: "NVIDIA A100"})
    board = report.leaderboard(report.entries(mixed), "top1_best")
    assert board.setting.nunique() == 1 and board.set_index("label").loc["kd", "n"] == 2
    kd = board.set_index("label").loc["kd"]
    speed = _level(mixed, "kd", "train_images_per_s")
    assert kd.train_images_per_s_per_device == f"H100 {speed[0]:,.1f} / A100 {speed[1]:,.1f}"
    text = report.render_report(board)
    assert "· cuda (NVIDIA H100, NVIDIA A100) · fp32" in text
    assert _rows(text)["kd"]["train img/s"] == kd.train_images_per_s_per_device
    assert "per device: this table pools runs that differ only in device model" in text
    costs = _rows(report.render_report(board, layout="paper").split("Cost per method")[1])
    assert costs["kd"]["img/s"] == kd.train_images_per_s_per_device

    one = report.leaderboard(report.entries(_on_gpus(table, {0: "NVIDIA H100", 1: "NVIDIA H100"})), "top1_best")
    assert (one.train_images_per_s_per_device == "").all() and "per device:" not in report.render_report(one)
    # device type, precision and the rest of the setting still split
    cpu = table.assign(run_id=table.run_id + "-cpu")
    assert report.leaderboard(report.entries(pd.concat([mixed, cpu])), "top1_best").setting.nunique() == 2


def test_a_shared_gpus_throughput_is_never_averaged_with_a_dedicated_ones(table):
    """--runs-per-gpu: seed 1's runs shared their H100 with 3 others; accuracy pools, img/s stays per device."""
    mixed = _on_gpus(table, {0: "NVIDIA H100", 1: "NVIDIA H100"})
    mixed["device_shared_by"] = mixed.seed.map({0: 1, 1: 4})
    board = report.leaderboard(report.entries(mixed), "top1_best")
    kd = board.set_index("label").loc["kd"]
    assert board.setting.nunique() == 1 and kd.n == 2  # the same numbers: one setting, both seeds
    speed = _level(mixed, "kd", "train_images_per_s")
    assert kd.train_images_per_s_per_device == f"H100 {speed[0]:,.1f} / H100 shared by 4 runs {speed[1]:,.1f}"
    assert "in how many runs shared a GPU" in report.render_report(board)
    alone = report.leaderboard(report.entries(mixed.assign(device_shared_by=1)), "top1_best")
    assert (alone.train_images_per_s_per_device == "").all()


def test_runs_of_several_processes_pool_with_one_process_runs_only_when_asked(table):
    """--pool-processes: seed 1 trained by 2 processes with sync BN; pooled, its img/s stays its own."""
    mixed = _on_gpus(table, {0: "NVIDIA H100", 1: "NVIDIA H100"})
    mixed["world_size"], mixed["sync_bn"] = mixed.seed.map({0: None, 1: 2}), mixed.seed.map({0: None, 1: True})
    apart = report.leaderboard(report.entries(mixed), "top1_best")
    assert apart.setting.nunique() == 2 and any("2 processes (sync BN)" in s for s in apart.setting)
    board = report.leaderboard(report.entries(report.pooled_processes(mixed)), "top1_best")
    kd = board.set_index("label").loc["kd"]
    assert board.setting.nunique() == 1 and kd.n == 2 and "processes" not in board.setting.iloc[0]
    speed = _level(mixed, "kd", "train_images_per_s")
    assert kd.train_images_per_s_per_device == (f"H100 {speed[0]:,.1f} / H100 x2 processes (sync BN) "
                                                f"{speed[1]:,.1f}")


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
    assert "kd[temperature=2.0] resnet14->resnet8 seed 1: failed" in report.describe(report.unfinished(alone))

    chained = other.assign(method_options=kd.method_options.values, assistants="resnet12:resnet10")
    board = report.leaderboard(report.entries(pd.concat([table, chained], ignore_index=True)), "top1_best")
    assert set(board.label) == {"teacher", "student (CE)", "kd", "kd via resnet12:resnet10"}


def test_delta_has_a_paired_t_interval_marked_when_it_excludes_zero(table):
    base = _level(table, "student", "top1_best")
    shifted = _with_top1(table, "kd", {0: base[0] + 1.0, 1: base[1] + 1.1})
    board = report.leaderboard(report.entries(shifted), "top1_best")
    kd = board.set_index("label").loc["kd"]
    half = stats.t.ppf(0.975, 1) * np.std([1.0, 1.1], ddof=1) / np.sqrt(2)
    assert (kd.delta_ci_low, kd.delta_ci_high) == pytest.approx((1.05 - half, 1.05 + half))
    assert kd.delta_excludes_zero and not board.set_index("label").loc["student (CE)", "delta_excludes_zero"]
    assert kd.p == pytest.approx(stats.ttest_rel(base + [1.0, 1.1], base).pvalue)
    assert kd.delta_significant and kd.p_adjusted == pytest.approx(kd.p)  # one method: Holm changes nothing
    text = report.render_report(board)
    assert "95 % confidence interval (t distribution, n − 1 degrees of freedom" in text.splitlines()[0]
    assert _rows(text)["kd"]["Δ 95 % CI"] == f"[{1.05 - half:+.2f}, {1.05 + half:+.2f}] *"
    assert _rows(text)["kd"]["p (Holm)"] == f"{kd.p:.3f}"

    mixed = _with_top1(table, "kd", {0: base[0] + 1.0, 1: base[1] - 1.0})
    kd = report.leaderboard(report.entries(mixed), "top1_best").set_index("label").loc["kd"]
    assert kd.delta_ci_low < 0 < kd.delta_ci_high and not kd.delta_excludes_zero

    # one paired seed: no interval, and the table says so
    one = table[~((table.method == "kd") & (table.seed == 1))]
    board = report.leaderboard(report.entries(one), "top1_best")
    kd = board.set_index("label").loc["kd"]
    assert kd.n == 1 and kd.delta_n == 1 and np.isnan(kd.delta_ci_low) and not kd.delta_excludes_zero
    assert _rows(report.render_report(board))["kd"]["Δ 95 % CI"] == "n/a"


def test_delta_plot_draws_the_leaderboard_interval_and_top1_plot_names_its_bars(table):
    base = _level(table, "student", "top1_best")
    shifted = _with_top1(table, "kd", {0: base[0] + 1.0, 1: base[1] + 1.1})
    frame = report.entries(shifted)
    kd = report.leaderboard(frame, "top1_best").set_index("label").loc["kd"]
    (_, group), = report.groups(frame)
    ax = report.plot_delta(group, "top1_best").axes[0]
    spans = [(np.nanmin(line.get_xdata()), np.nanmax(line.get_xdata())) for line in ax.lines]  # bar with caps
    assert pytest.approx((kd.delta_ci_low, kd.delta_ci_high)) in spans
    assert "95 % CI of the paired Δ" in ax.get_xlabel()
    assert "sd over seeds" in report.plot_top1(group, "top1_best").axes[0].get_xlabel()


def test_rows_are_labelled_by_what_their_loss_contains(table):
    kd = table.method == "kd"
    fitnet = table.assign(method=table.method.mask(kd, "fitnet"), method_label=table.method_label.mask(
        kd, "fitnet (+KD)"), method_options=table.method_options.mask(kd, "hint_layer=1"))
    assert set(report.leaderboard(report.entries(fitnet), "top1_best").label) == {
        "teacher", "student (CE)", "fitnet (+KD)"}
    other = fitnet[kd].assign(run_id=fitnet.run_id + "-h2", method_options="hint_layer=2")
    board = report.leaderboard(report.entries(pd.concat([fitnet, other], ignore_index=True)), "top1_best")
    assert set(board.label) == {"teacher", "student (CE)", "fitnet (+KD)[hint_layer=1]",
                                "fitnet (+KD)[hint_layer=2]"}

    older = table.assign(method_label=None)  # a table from before method_label: the method's name
    assert set(report.leaderboard(report.entries(older), "top1_best").label) == {"teacher", "student (CE)", "kd"}
    failed = table.assign(method_label=table.method_label.mask(table.method == "probe-nan", "probe-nan (+KD)"))
    assert "probe-nan (+KD) resnet8 seed 0: failed" in report.describe(report.unfinished(failed))


def _coded(table: pd.DataFrame, **changes: tuple[str, str, str, bool]) -> pd.DataFrame:
    """``table`` with code_core, code_fingerprint, git_sha and git_dirty set: commit a, one fingerprint per
    method; ``changes`` maps "<method>_s<seed>" (or "teacher") to other (core, fingerprint, sha, dirty)."""
    table = table.assign(code_core="core-a", code_fingerprint="fp-" + table.method, git_sha="a" * 40,
                         git_dirty=False)
    for key, values in changes.items():
        rows = (table.role == "teacher") if key == "teacher" else \
            (table.role == "student") & (table.method + "_s" + table.seed.astype(str) == key)
        table.loc[rows, ["code_core", "code_fingerprint", "git_sha", "git_dirty"]] = values
    return table


def test_rows_made_by_other_code_are_marked_with_their_commits(table):
    same = report.leaderboard(report.entries(_coded(table)), "top1_best")
    assert not same.other_code.any() and "†" not in report.render_report(same)

    # one seed of kd ran other method code (a dirty tree): its row is marked, the others are not
    board = report.leaderboard(report.entries(_coded(table, kd_s1=("core-a", "fp-kd2", "b" * 40, True))))
    assert board.set_index("label").other_code.to_dict() == {"teacher": False, "student (CE)": False, "kd": True}
    text = report.render_report(board)
    assert "kd †" in _rows(text)
    assert "† made by other code than the rest of the table" in text
    assert "Commits: kd aaaaaaa, bbbbbbb+dirty; the other rows aaaaaaa." in text

    # the teacher's shared code differs from the table's most common
    board = report.leaderboard(report.entries(_coded(table, teacher=("core-b", "fp-student", "c" * 40, False))))
    assert board.set_index("label").other_code.to_dict() == {"teacher": True, "student (CE)": False, "kd": False}
    assert "teacher resnet14 (seed 0) †" in _rows(report.render_report(board))

    older = table.assign(code_core=None, code_fingerprint=None)  # a table from before fingerprints
    board = report.leaderboard(report.entries(older), "top1_best")
    assert not board.other_code.any() and "†" not in report.render_report(board)


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


def test_several_results_dirs_are_read_together_and_a_run_in_both_counted_once(capsys, tmp_path, tiny_results,
                                                                               table):
    first = pd.read_parquet(tiny_results / "metrics.parquet")
    again = first[(first.method == "kd") & (first.seed == 0)].assign(value=-1.0)  # already in the first dir
    seed1 = first[first.method.isin(["kd", "student"]) & (first.role == "student") & (first.seed == 1)]
    seed2 = seed1.assign(run_id=seed1.run_id + "-s2", seed=2)
    second = tmp_path / "second"
    second.mkdir()
    pd.concat([again, seed2], ignore_index=True).to_parquet(second / "metrics.parquet")

    both = report.load_results([str(tiny_results), second])
    kd = both[(both.method == "kd") & (both.metric == "top1_best") & both.epoch.isna()]
    assert sorted(kd.seed) == [0, 1, 2] and (kd.value >= 0).all()  # the first dir's copy is the one kept
    assert set(kd.results_dir) == {str(tiny_results), str(second)}
    assert list(report.duplicate_runs(both).run_id) == list(again.run_id.unique())

    code, out, err = _report(capsys, "--results-dir", str(tiny_results), "--results-dir", str(second))
    assert code == 0 and err == ""
    assert _rows(out)["kd"]["n"] == _rows(out)["student resnet8 (CE)"]["n"] == "3"
    assert (f"Counted once (1 run in more than one results directory, read from the first): "
            f"{again.run_id.iloc[0]} ({tiny_results}; also in {second})") in out
    assert "Counted once" not in _report(capsys, "--results-dir", str(tiny_results))[1]
    assert f"results directory {tmp_path / 'nowhere'} does not exist" in _one_line_error(
        capsys, "--results-dir", str(tiny_results), "--results-dir", str(tmp_path / "nowhere"))


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
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert f"results directory {a_file} is a file" in _one_line_error(capsys, "--results-dir", str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no runs" in _one_line_error(capsys, "--results-dir", str(empty))
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
    assert "argument --correction: invalid choice: 'bonferroni' (choose from 'holm', 'bh', 'none')" in _one_line_error(
        capsys, "--results-dir", results, "--correction", "bonferroni")


def test_a_teacher_with_its_own_recipe_heads_its_students_table_and_plots_skip_teachers_alone(tmp_path, table):
    """Teachers trained under their own recipe (`--recipe cpu` → `cpu-teacher`) form a setting of their own: the
    teacher still heads the table of the runs that learned from it, with a footnote naming its recipe; a teacher
    that no run learned from makes a CE-only table and no plot (nothing to plot)."""
    own = table.assign(recipe=table.recipe.where(table.role != "teacher", "cpu-teacher"))
    lonely = own[own.role == "teacher"].assign(run_id=lambda t: t.run_id + "-lonely", student="resnet20")
    entries = report.entries(pd.concat([own, lonely], ignore_index=True))
    board = report.leaderboard(entries, "top1_best")
    pair = board[board.pair == "resnet14->resnet8"]
    assert list(pair.kind[:2]) == ["teacher", "student"] and pair.setting.nunique() == 1
    assert "recipe cpu-teacher" in pair.trained_in.iloc[0] and "recipe cpu-teacher" not in pair.setting.iloc[0]
    text = report.render_report(board)
    assert "teacher resnet14: trained under recipe cpu-teacher" in text
    filtered = report.entries(pd.concat([own, lonely], ignore_index=True), recipe="tiny")
    assert set(filtered.kind) == {"teacher", "student", "method"} and set(filtered.recipe) == {"tiny", "cpu-teacher"}
    assert "teacher resnet20" in text  # the lonely teacher's CE-only table
    written = report.save_plots(entries, own, tmp_path / "plots")
    folders = {p.parent for p in written}
    assert len(folders) == 1 and "cpu-teacher" not in next(iter(folders)).name
    assert "teacher resnet14: trained under recipe cpu-teacher" in report.render_report(board, layout="paper")


@pytest.mark.parametrize("method, protocol, shown, source", [
    ("at", "official", "70.55", "CRD (Tian et al. ICLR 2020) Table 1"),  # RepDistiller's code
    ("dkd", "official", "71.97 [best_mean5]", "mdistiller README (DKD table)"),  # one objective, every protocol
    ("dkd", "semckd", "71.97 [best_mean5]", "mdistiller README (DKD table)"),
    ("crd", "semckd", "71.63", "(protocol crd) (as crd+kd)"),  # CE + KD + 0.8 CRD is RepDistiller's CRD+KD
    ("dist", "crd", "71.75 ± 0.30 [mean]", "hunto/DIST_KD README"),  # CE + 2·DIST under every protocol
    ("kd_ls", "semckd", "71.43 [best]", "sunshangquan/logit-standardization-KD README"),  # LS: one objective
])
def test_published_numbers_of_zoo_methods_sit_beside_the_protocol_that_reproduces_them(table, method, protocol,
                                                                                       shown, source):
    frame = _as_cifar100(table)
    frame = frame.assign(method=frame.method.replace({"kd": method}),
                         method_label=frame.method_label.replace({"kd": method}),
                         protocol=frame.protocol.replace({"crd": protocol}))
    board = report.leaderboard(report.entries(frame), "top1_last", report.load_published(PUBLISHED))
    row = board.set_index("label").loc[method]
    assert shown in row.published.split(" / ") and source in row.published_source
    protocol = {"dkd": "dkd", "dist": "other", "kd_ls": "other"}.get(method, "crd")
    assert f"(protocol {protocol})" in row.published_source


def test_p_values_are_adjusted_over_the_methods_of_a_table():
    p = pd.Series([0.01, 0.04, 0.03, np.nan])
    assert list(report.adjust(p, "holm")[:3]) == pytest.approx([0.03, 0.06, 0.06])  # Holm 1979, step-down
    assert list(report.adjust(p, "bh")[:3]) == pytest.approx([0.03, 0.04, 0.04])  # Benjamini-Hochberg 1995
    assert list(report.adjust(p, "none")[:3]) == [0.01, 0.04, 0.03]
    assert all(np.isnan(report.adjust(p, c)[3]) for c in report.CORRECTIONS)  # no test: not counted


def test_the_star_marks_only_what_survives_the_correction(table):
    kd = table[table.method == "kd"]
    variants = [kd.assign(run_id=kd.run_id + f"-t{t}", method_options=f"temperature={t}") for t in (1.0, 2.0)]
    three = pd.concat([table.assign(method_options=table.method_options.mask(table.method == "kd", "temperature=4.0")),
                       *variants], ignore_index=True)
    base = _level(table, "student", "top1_best")
    shifted = report.entries(_with_top1(three, "kd", {0: base[0] + 1.0, 1: base[1] + 1.1}))
    board = report.leaderboard(shifted, "top1_best")
    methods = board[board.kind == "method"]
    assert len(methods) == 3 and methods.delta_excludes_zero.all()  # each interval excludes zero alone ...
    assert methods.p_adjusted.to_numpy() == pytest.approx(3 * methods.p.to_numpy())  # ... not after Holm
    assert not methods.delta_significant.any()
    text = report.render_report(board)
    assert "*" not in "".join(row["Δ 95 % CI"] for row in _rows(text).values())
    assert "* Δ over the CE student with Holm-adjusted p < 0.05 over the 3 methods of this table" in text
    paper = _rows(report.render_report(board, layout="paper").split("Cost per method")[0])
    assert not any(row["resnet14->resnet8"].endswith(" *") for row in paper.values())

    unadjusted = report.leaderboard(shifted, "top1_best", correction="none")
    assert unadjusted[unadjusted.kind == "method"].delta_significant.all()
    assert all(row["Δ 95 % CI"].endswith(" *") for label, row in _rows(report.render_report(unadjusted)).items()
               if label.startswith("kd"))
    paper = _rows(report.render_report(unadjusted, layout="paper").split("Cost per method")[0])
    assert all(row["resnet14->resnet8"].endswith(" *") for label, row in paper.items() if label.startswith("kd"))
    with pytest.raises(KdbenchError, match="unknown correction 'bonferroni'; valid corrections: holm, bh, none"):
        report.leaderboard(shifted, "top1_best", correction="bonferroni")


def _teachers_scenario(table: pd.DataFrame) -> pd.DataFrame:
    """Issue 25's sweep: kd and CE over seeds 0, 1, 2 with the teacher of seed 0, then kd seed 0 again with a teacher
    of seed 1 (`--teacher-seed 1`)."""
    table = table[table.method != "probe-nan"]
    kd, ce = table.method == "kd", (table.method == "student") & (table.role == "student")
    seed2 = table[(kd | ce) & (table.seed == 1)].assign(run_id=lambda t: t.run_id + "-s2", seed=2)
    teacher1 = table[table.role == "teacher"].assign(run_id="teacher-seed1", seed=1, teacher_seed=1)
    kd_t1 = table[kd & (table.seed == 0)].assign(run_id=lambda t: t.run_id + "-t1", teacher_run="teacher-seed1",
                                                 teacher_seed=1)
    return pd.concat([table, seed2, teacher1, kd_t1], ignore_index=True)


def test_runs_taught_by_different_teachers_are_separate_rows_and_teachers_never_pooled(table):
    scenario = _teachers_scenario(table)
    board = report.leaderboard(report.entries(scenario), "top1_best").set_index("label")
    assert board.n.to_dict() == {"teacher (seed 0)": 1, "teacher (seed 1)": 1, "student (CE)": 3,
                                 "kd (teacher seed 0)": 3, "kd (teacher seed 1)": 1}
    assert board.loc["kd (teacher seed 0)", "seeds"] == "0,1,2" and board.loc["kd (teacher seed 1)", "seeds"] == "0"
    base, kd = _level(scenario, "student", "top1_best"), _level(scenario[scenario.teacher_run != "teacher-seed1"],
                                                                 "kd", "top1_best")
    assert board.loc["kd (teacher seed 0)", "mean"] == pytest.approx(kd.mean())  # no seed counted twice
    assert board.loc["kd (teacher seed 0)", "delta"] == pytest.approx((kd - base).mean())
    taught_by_1 = _level(scenario[scenario.teacher_run == "teacher-seed1"], "kd", "top1_best")
    assert board.loc["kd (teacher seed 1)", "delta"] == pytest.approx(taught_by_1[0] - base[0])
    assert board.loc["kd (teacher seed 1)", "delta_n"] == 1  # paired with the CE run of its student seed
    # each teacher's cost is shared by the runs that learned from it: three for seed 0's, one for seed 1's
    own = sum(_level(table, "kd", m) for m in ("wall_s", "prepare_s", "reused_fit_s"))  # seeds 0, 1; 2 copies 1
    teacher_wall = _level(table, "kd", "teacher_wall_s")[0]
    assert board.loc["kd (teacher seed 0)", "end_to_end_s"] == pytest.approx((own[0] + 2 * own[1]) / 3
                                                                             + teacher_wall / 3)
    assert board.loc["kd (teacher seed 1)", "end_to_end_s"] == pytest.approx(own[0] + teacher_wall)
    text = report.render_report(board.reset_index())
    assert "### resnet14->resnet8 · teacher seeds 0, 1 ·" in text
    assert {"teacher resnet14 (seed 0)", "teacher resnet14 (seed 1)", "kd (teacher seed 1)"} <= set(_rows(text))
    (_, group), = report.groups(report.entries(scenario))  # the top-1 plot draws each teacher, not their mean
    teacher_top1 = board.loc["teacher (seed 0)", "mean"]
    assert {t.get_text() for t in report.plot_top1(group, "top1_best").axes[0].texts} == {
        f"teacher (seed {seed}) {teacher_top1:.1f}" for seed in (0, 1)}

    # the teacher_seed column, where written, is used as it is
    explicit = scenario.assign(teacher_seed=scenario.teacher_run.map({"teacher-seed1": 7}).fillna(0))
    assert "kd (teacher seed 7)" in set(report.leaderboard(report.entries(explicit), "top1_best").label)
    # two teachers of one seed (say, two teacher recipes) still give two rows, told apart by their runs
    same_seed = scenario.assign(teacher_seed=0)
    labels = report.leaderboard(report.entries(same_seed), "top1_best").set_index("label").n.to_dict()
    assert labels["kd (teacher seed 0, run teacher-seed1)"] == 1 and sum(
        n for label, n in labels.items() if label.startswith("kd (")) == 4

    # a sweep over several teacher seeds on purpose (--teacher-seeds 0,1) is one row, reported as such
    pooled = scenario.assign(teacher_pool=scenario.method.eq("kd").map({True: "0,1", False: None}))
    board = report.leaderboard(report.entries(pooled), "top1_best").set_index("label")
    assert board.loc["kd", "n"] == 4 and board.loc["kd", "teacher_seeds"] == "teacher seeds 0,1 (pooled)"
    assert "· teacher seeds 0,1 (pooled) ·" in report.render_report(board.reset_index())


def test_assistants_are_amortised_over_the_runs_that_used_them():
    wide = pd.DataFrame({
        "run_id": ["T", "A", "s0", "s1", "s2"], "role": ["teacher", "assistant", "student", "student", "student"],
        "teacher_run": [None, "T", "T", "T", "T"], "assistant_runs": [None, None, "A", "A", None],
        "wall_s": [100.0, 40.0, 10.0, 10.0, 10.0], "prepare_s": [None, None, 1.0, 1.0, 1.0],
        "reused_fit_s": [None, None, 0.0, 0.0, 2.0], "teacher_wall_s": [None, 100.0, 100.0, 100.0, 100.0],
        "assistant_wall_s": [None, None, 40.0, 40.0, 0.0]})
    cost, in_full = report.load.amortised_costs(wide)
    assert list(cost) == pytest.approx([100.0, 40.0 + 100 / 3, 11 + 100 / 3 + 20, 11 + 100 / 3 + 20,
                                        13 + 100 / 3])
    assert not in_full.any()
    older = wide.assign(assistant_runs=None)  # a table before assistant_runs: assistants charged in full, said so
    cost, in_full = report.load.amortised_costs(older)
    assert cost[2] == pytest.approx(11 + 100 / 3 + 40) and list(in_full) == [False, False, True, True, False]


def _with_validation(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` as if its student runs held out a validation split: top1_at_best_val = top1_last - 1 (the teacher is
    an imported checkpoint: none)."""
    last = table[(table.metric == "top1_last") & table.epoch.isna() & (table.role == "student")]
    return pd.concat([table.assign(val_split=table.role.map({"student": 500})),
                      last.assign(metric="top1_at_best_val", value=last.value - 1, val_split=500)],
                     ignore_index=True)


def test_the_validation_metric_is_the_default_where_every_run_recorded_it(table):
    frame = report.entries(_with_validation(table))
    board = report.leaderboard(frame)
    rows = board.set_index("label")
    assert (board.metric == "top1_at_best_val").all() and (board.metric_note == "").all()
    assert rows.loc["kd", "mean"] == pytest.approx((_level(table, "kd", "top1_last") - 1).mean())
    # the teacher (no validation history) falls back to its last epoch, with a note, never a blank
    assert rows.loc["teacher", "metric_shown"] == "top1_last" and rows.loc["teacher", "n"] == 1
    text = report.render_report(board)
    assert text.startswith("Top-1 = top1_at_best_val of each run: test top-1 at the epoch of best validation top-1")
    assert "teacher resnet14 (seed 0): top1_last, as it recorded no top1_at_best_val" in text
    assert "top1_at_best_val %" in _rows(text)["kd"]
    assert "### resnet14->resnet8 · teacher seed 0 · synthetic · recipe tiny (3 epochs, batch 32, 500 validation " \
        "images)" in text  # a validation split is part of the setting

    published = report.load_published(PUBLISHED)  # published numbers keep their own rule: never validation-selected
    cifar = report.leaderboard(report.entries(_as_cifar100(_with_validation(table))), None, published)
    assert cifar.set_index("label").loc["kd", "published"] == "70.66 [last]"
    assert "never selected on a validation split" in report.render_report(cifar).splitlines()[0]


def test_docs_pandas_snippet_keeps_the_ce_baseline_and_the_teachers(tiny_results, monkeypatch):
    page = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    snippet = page.split("```python\n")[1].split("```")[0]
    assert 'pd.read_parquet("results/metrics.parquet")' in snippet
    monkeypatch.chdir(tiny_results.parent)  # the fixture's results directory is named results/
    scope: dict = {}
    exec(snippet, scope)
    runs = scope["runs"].reset_index()
    teacher = runs[runs.role == "teacher"]
    ce = runs[(runs.role == "student") & (runs.method == "student")]
    assert len(teacher) == 1 and sorted(ce.seed) == [0, 1] and sorted(runs[runs.method == "kd"].seed) == [0, 1]
    assert list(ce.sort_values("seed").top1_best) == list(_level(report.load_results(tiny_results), "student",
                                                                 "top1_best"))
