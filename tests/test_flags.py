"""Report flags (kdbench.report.flags) on tidy tables with each artefact: the generated 25-method table with a weak
teacher assistant, a method that diverged at its defaults, documented deviations and runs still improving at their
last epoch; and the committed reference set, where they happened."""

import io
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from synthetic_results import EPOCHS, _run, synthetic_table

from kdbench import report
from kdbench.methods import method_class
from kdbench.report.flags import FLAGS, add_flags, footnotes, for_plots, row_flags
from kdbench.report.load import conform

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference-fashion-mnist-cpu-v1"
PAIR = ("resnet56", "resnet20")
OFD_NOTE = method_class("ofd").note
DIVERGED = "RunFailed: non-finite training loss (nan) in main epoch 1"


def _runs_of(table: pd.DataFrame, method: str) -> pd.Series:
    return table["method"].eq(method) & table["role"].eq("student")


def _artefacts(assistant_runs: bool = False, teacher_top1: float | None = None) -> pd.DataFrame:
    """The generated table on one pair, with: a TAKD chain through a resnet32 assistant at about 50 % (CE: about
    70 %); SemCKD's runs at its defaults failed with a non-finite loss and its finished runs at beta = 50; OFD's
    runs recording its eval-mode note, beside a variant with teacher_batch_stats; KD best at its last epoch in two
    seeds of three, every other run at epoch 6 of 12. ``assistant_runs``: the TAKD runs name their assistant runs
    (the column the harness may write); ``teacher_top1``: the teacher's top1_best."""
    table = synthetic_table(pairs=(PAIR,))
    rng = np.random.default_rng(1)
    assistants = pd.DataFrame([row for seed in range(3) for row in _run(
        rng, f"assistant-resnet32-{seed}", "assistant", "kd", *PAIR[:1], "resnet32", seed, 50.0, "logit", 4.6e5,
        1500.0)])
    table = pd.concat([table, conform(assistants).assign(results_dir="synthetic")], ignore_index=True)
    takd = _runs_of(table, "takd")
    table.loc[takd, "assistants"] = "resnet32"
    if assistant_runs:
        table["assistant_runs"] = None
        table.loc[takd, "assistant_runs"] = "assistant-resnet32-" + table.loc[takd, "seed"].astype(str)

    semckd = _runs_of(table, "semckd")
    table.loc[semckd, ["method_options", "method_overrides"]] = ["beta=50.0,ce_weight=1.0", "beta=50.0"]
    failed = table[semckd & table["metric"].eq("top1_best")].assign(
        run_id=lambda f: f["run_id"] + "-defaults", status="failed", error=DIVERGED, method_options="beta=400.0",
        method_overrides="", metric="epochs_completed", value=0.0)

    ofd = _runs_of(table, "ofd")
    table.loc[ofd, ["method_options", "method_note"]] = ["beta=0.001,teacher_batch_stats=False", OFD_NOTE]
    batch_stats = table[ofd].assign(run_id=lambda f: f["run_id"] + "-batch-stats",
                                    method_options="beta=0.001,teacher_batch_stats=True",
                                    method_overrides="teacher_batch_stats=True", method_note="batch statistics")

    table = pd.concat([table, failed, batch_stats], ignore_index=True)
    level = table[table["metric"].eq("top1_best") & table["status"].eq("finished")]
    last = _runs_of(level, "kd") & level["seed"].isin([0, 1])
    epochs = pd.concat([level.assign(metric="top1_best_epoch", value=last.map({True: EPOCHS, False: 6})),
                        level.assign(metric="epochs_completed", value=float(EPOCHS))])
    table = pd.concat([table, epochs], ignore_index=True)
    if teacher_top1 is not None:
        table.loc[table["role"].eq("teacher") & table["metric"].eq("top1_best"), "value"] = teacher_top1
    return table


def _kd_rise(table: pd.DataFrame) -> str:
    """KD's seeds best at their last epoch (0 and 1): their last evaluation's mean rise over the one before."""
    curves = table[_runs_of(table, "kd") & table["seed"].isin([0, 1]) & table["metric"].eq("top1")
                   & table["epoch"].notna()]
    return f"{np.mean([g.sort_values('epoch')['value'].diff().iloc[-1] for _, g in curves.groupby('run_id')]):+.2f}"


def _board(table: pd.DataFrame) -> pd.DataFrame:
    frame = report.entries(table)
    return add_flags(report.leaderboard(frame), frame, table)


def _rows(text: str) -> dict[str, str]:
    """A github table's rows by their first cell."""
    return {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return _artefacts()


@pytest.fixture(scope="module")
def board(table) -> pd.DataFrame:
    return _board(table)


def test_a_divergence_under_another_validation_split_is_not_this_settings():
    """Runs that differ in their recipe's validation split are another setting: their failures flag nothing here."""
    table = _artefacts()
    failed = table["status"].eq("failed")
    table["val_split"] = table["val_split"].astype("object")
    table.loc[failed, "val_split"] = 5000
    board = _board(table).set_index("label")
    assert board.loc["semckd[beta=50.0]", "flags"] == ""


@pytest.mark.parametrize("assistant_runs", [False, True])
def test_each_artefact_flags_its_row_and_a_clean_row_carries_none(assistant_runs):
    table = _artefacts(assistant_runs)
    board = _board(table).set_index("label")
    assert board.loc["takd", "flags"] == "weak_teacher"
    assert board.loc["takd", "flag_weak_teacher"].startswith("assistant resnet32 ")
    assert board.loc["takd", "flag_weak_teacher"].endswith(f"vs CE {board.loc['student (CE)', 'mean']:.2f} %")
    assert board.loc["dgkd", "flags"] == ""  # no assistant in its runs: nothing is made up
    assert board.loc["semckd[beta=50.0]", "flags"] == "diverged_default"
    assert board.loc["semckd[beta=50.0]", "flag_diverged_default"] == "3 runs at the defaults failed; beta=50.0"
    assert board.loc["ofd[teacher_batch_stats=False]", "flag_deviation"] == OFD_NOTE
    assert board.loc["ofd[teacher_batch_stats=True]", "flags"] == ""  # normalised as the official codes do
    assert board.loc["ofd[teacher_batch_stats=True]", "method_note"] == "batch statistics"  # a note stays a note
    assert board.loc["sakd", "flag_deviation"] == method_class("sakd").deviation
    assert board.loc["kd", "flags"] == "still_improving"
    assert board.loc["kd", "flag_still_improving"] == f"2 of 3 seeds, {_kd_rise(table)}"
    assert board.loc["dkd", ["flags", *(f"flag_{key}" for key in FLAGS)]].eq("").all()
    assert board.loc["teacher", "flags"] == ""


def test_leaderboard_text_html_and_latex_carry_markers_and_one_line_footnotes(board, table):
    text = report.render_report(board)
    rows = _rows(text)
    assert "takd [w]" in rows and "semckd[beta=50.0] [d]" in rows and "kd [e]" in rows
    assert "ofd[teacher_batch_stats=False] [o]" in rows and "dkd" in rows
    assert "ofd[teacher_batch_stats=True] [1]" in rows
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("[w] ")] == [
        f"[w] {FLAGS['weak_teacher'].meaning}: takd ({board.set_index('label').loc['takd', 'flag_weak_teacher']})"]
    assert f"[d] {FLAGS['diverged_default'].meaning}: semckd[beta=50.0] (3 runs at the defaults failed; " \
           f"beta=50.0)" in lines
    assert f"[o] ofd[teacher_batch_stats=False]: {FLAGS['deviation'].meaning}: {OFD_NOTE}" in lines
    assert text.count(OFD_NOTE) == 1  # the run's note is shown once, as the flag
    assert f"[e] {FLAGS['still_improving'].meaning}: kd (2 of 3 seeds, {_kd_rise(table)})" in lines
    assert not any("dkd" in line for line in lines if line[:3] in {f.marker for f in FLAGS.values()})
    assert "warning:" not in text

    html = report.render_report(board, "html")
    assert "takd [w]" in html and f"<p>[w] {FLAGS['weak_teacher'].meaning}: takd (" in html
    latex = report.render_report(board, "latex")
    assert "semckd[beta=50.0] [d] &" in latex and "[d] diverged (non-finite loss)" in latex


def test_csv_has_the_flag_keys_and_what_each_shows(board):
    csv = pd.read_csv(io.StringIO(report.render_report(board, "csv")), keep_default_na=False).set_index("label")
    assert csv.loc["takd", "flags"] == "weak_teacher" and csv.loc["dkd", "flags"] == ""
    assert csv.loc["semckd[beta=50.0]", "flag_diverged_default"].startswith("3 runs")
    assert csv.loc["ofd[teacher_batch_stats=False]", "flag_deviation"] == OFD_NOTE
    assert csv.loc["ofd[teacher_batch_stats=False]", "method_note"] == ""  # moved into the flag
    paper = pd.read_csv(io.StringIO(report.render_report(board, "csv", layout="paper")), keep_default_na=False)
    paper = paper.set_index("label")
    assert paper.loc["kd", "resnet56->resnet20 flags"] == "still_improving"
    assert paper.loc["dkd", "resnet56->resnet20 flags"] == ""


def test_paper_layout_marks_the_cells_and_names_the_pair_in_footnotes():
    table = pd.concat([_artefacts(), synthetic_table(pairs=(("vgg13", "vgg8"),))], ignore_index=True)
    board = _board(table)
    text = report.render_report(board, layout="paper")
    rows = _rows(text.split("Cost per method")[0])  # the accuracy table
    takd = [cell.strip() for cell in rows["takd"].strip("|").split("|")]
    assert takd[1].replace("*", "").strip().endswith(" [w]") and "[" not in takd[2]  # on resnet56->resnet20 only
    assert f"[w] {FLAGS['weak_teacher'].meaning}: takd on resnet56->resnet20 (assistant resnet32 " in text
    assert rows["dkd"].count("[") == 0


def test_a_teacher_not_above_its_ce_student_is_warned_and_flagged():
    board = _board(_artefacts(teacher_top1=60.0))
    ce = board.set_index("label").loc["student (CE)", "mean"]
    text = report.render_report(board)
    warning = (f"warning: teacher resnet56 (60.00 %) is not above its CE student resnet20 ({ce:.2f} %) in "
               f"resnet56->resnet20 · {board['setting'].iloc[0]} · protocol official")
    assert text.splitlines()[2] == warning  # under the rule, above the tables
    assert warning in report.render_report(board, layout="paper").splitlines()[0]
    rows = _rows(text)
    assert "teacher resnet56 (seed 0) [w]" in rows and "dkd [w]" in rows and "takd [w]" in rows
    by_label = board.set_index("label")
    assert by_label.loc["teacher", "flag_weak_teacher"] == f"teacher resnet56 60.00 % vs CE {ce:.2f} %"
    assert by_label.loc["takd", "flag_weak_teacher"].startswith("teacher resnet56 60.00 %, assistant resnet32 ")


def test_every_plot_draws_the_flagged_labels_and_the_footnotes(table, tmp_path):
    frame = report.entries(table)
    group, notes = for_plots(frame, row_flags(frame, table))
    assert {"takd [w]", "semckd[beta=50.0] [d]", "kd [e]", "ofd[teacher_batch_stats=False] [o]", "dkd"} <= set(
        group["label"])
    assert set(notes) == set(footnotes(_board(table))) and len(notes) == 6  # w, d, o for ofd, sakd and cc, e
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        written = report.save_plots(frame, table, tmp_path)
    svgs = [p for p in written if p.suffix == ".svg"]
    assert len(svgs) == 6
    for svg in svgs:
        text = svg.read_text()
        assert "takd [w]" in text and "[w] teacher or assistant not above" in text, svg.name
        assert "dkd [" not in text  # the clean row is unmarked


def test_the_reference_set_flags_what_its_readme_explains():
    """TAKD's and DGKD's assistants are below CE, SemCKD's beta = 50 row stands in for its diverged defaults, and
    OFD, SAKD and CC deviate from their official code (docs/reference-results.md, and the method family pages
    docs/methods/feature.md and docs/methods/relation.md)."""
    table = report.load_results(REFERENCE)
    board = _board(table)
    flags = board[board["pair"] == "resnet56->resnet20"].set_index("label")["flags"]
    assert {label for label, keys in flags.items() if "weak_teacher" in keys} == {"takd", "dgkd"}
    assert {label for label, keys in flags.items() if "diverged_default" in keys} == {"semckd (+KD)[beta=50.0]"}
    assert {label for label, keys in flags.items() if "deviation" in keys} == {"ofd", "sakd", "cc"}
    assert not report.render_report(board).count("warning:")


def test_a_row_with_fewer_seeds_than_its_table_is_flagged_with_its_n():
    """SemCKD on vgg13 → vgg8 has three seeds in the reference set against five elsewhere: its row says so."""
    table = _artefacts()
    table = table[~(_runs_of(table, "dkd") & table["seed"].eq(2))]
    board = _board(table).set_index("label")
    assert board.loc["dkd", "flags"] == "few_seeds" and board.loc["dkd", "flag_few_seeds"] == "n = 2 of 3"
    assert board.loc["dkd", "n"] == 2
    assert not board.drop(index="dkd")["flag_few_seeds"].any()  # the teacher's single run included
    assert f"[n] {FLAGS['few_seeds'].meaning}: dkd (n = 2 of 3)" in footnotes(board.reset_index())
