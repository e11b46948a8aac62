"""Paper-ready output: the paper layout (LaTeX with booktabs, GitHub, CSV), clean numbers, published numbers matched
on dataset, recipe and protocol, and plots that keep 25 methods apart."""

import re
import shutil
import subprocess

import pandas as pd
import pytest
from synthetic_results import PAIRS, ZOO, synthetic_table
from test_report import PUBLISHED, _as_cifar100, tiny_results  # noqa: F401  (the session's tiny sweep)

from kdbench import report
from kdbench.cli import main
from kdbench.report.style import styles


@pytest.fixture(scope="module")
def zoo() -> pd.DataFrame:
    return synthetic_table()


@pytest.fixture(scope="module")
def zoo_board(zoo) -> pd.DataFrame:
    return report.leaderboard(report.entries(zoo))


def _github_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_paper_table_puts_methods_in_rows_pairs_in_columns_best_in_bold(zoo_board):
    text = report.render_report(zoo_board, "github", layout="paper")
    accuracy = _github_rows(text.split("Cost per method")[0])
    header, rows = accuracy[0], {r[0]: r[1:] for r in accuracy[1:]}
    assert header == ["method", "resnet56->resnet20", "vgg13->vgg8", "resnet32x4->resnet8x4", "mean rank"]
    assert [r[0] for r in accuracy[1:3]] == ["Teacher", "Student (CE)"] and set(rows) == {
        "Teacher", "Student (CE)", *ZOO}
    ranks = []
    for column, pair in enumerate(header[1:-1]):
        means = zoo_board[(zoo_board.pair == pair) & (zoo_board.kind == "method")].set_index("label")["mean"]
        bold = [name for name, cells in rows.items() if cells[column].startswith("**")]
        assert bold == [means.idxmax()]
        assert rows[means.idxmax()][column].removesuffix(" *") == f"**{means.max():.2f} ± " \
            f"{zoo_board.set_index(['pair', 'label']).loc[(pair, means.idxmax()), 'std']:.2f}**"
        ranks.append(means.rank(ascending=False))
        significant = zoo_board[(zoo_board.pair == pair) & zoo_board.delta_significant].label
        assert {name for name, cells in rows.items() if cells[column].endswith(" *")} == set(significant)
    mean_rank = pd.concat(ranks, axis=1)  # DKD's summary: the mean over pairs of each method's rank, ± std
    assert {name: cells[-1] for name, cells in rows.items() if name in ZOO} == {
        name: f"{r.mean():.2f} ± {r.std():.2f}" for name, r in mean_rank.iterrows()}
    assert rows["Teacher"][-1] == rows["Student (CE)"][-1] == ""
    assert "mean ± std over n = 3 seeds" in text and "best method per pair in bold" in text
    assert "Holm-adjusted p < 0.05 over the methods of each pair" in text
    costs = _github_rows(text.split("Cost per method")[1])  # pairs stacked: a title row, then the pair's rows
    assert costs[0] == ["method", "img/s", "peak MiB", "extra params", "end-to-end min"]
    titles = [i for i, r in enumerate(costs) if r[0] in header[1:-1]]
    assert [costs[i][0] for i in titles] == header[1:-1] and all(c == "" for i in titles for c in costs[i][1:])
    assert len(costs) == 1 + 3 * len(accuracy[1:]) + 3


def test_paper_latex_uses_booktabs_a_caption_and_no_raw_unicode(zoo_board):
    text = report.render_report(zoo_board, "latex", layout="paper")
    tables = re.findall(r"\\begin\{table\}.*?\\end\{table\}", text, re.S)
    assert len(tables) == 2
    for table in tables:
        assert "\\toprule" in table and "\\midrule" in table and "\\bottomrule" in table and "\\hline" not in table
        assert re.search(r"\\caption\{.*n = 3 seeds|\\caption\{Cost per method", table)
        assert not re.search(r"[±Δ→·†–]", table), "raw unicode in LaTeX"
    assert "$\\pm$" in tables[0] and "\\textbf{" in tables[0] and "$\\rightarrow$" in tables[0]
    assert "\\multicolumn{5}{l}{\\emph{resnet56$\\rightarrow$resnet20}}" in tables[1]
    # the teacher and student rows are set off from the methods by a rule
    assert re.search(r"Student \(CE\) &[^\n]*\\\\\n\\midrule", tables[0])



def test_a_pair_without_a_finished_run_of_a_method_says_so_in_its_cell(zoo_board):
    """A method that never finished on a pair (every seed failed, or not run) gets a dash and a footnote, not a
    blank that reads like a rendering fault."""
    board = zoo_board[~((zoo_board.pair == "vgg13->vgg8") & (zoo_board.label == "dkd"))]
    text = report.render_report(board, "github", layout="paper")
    rows = {r[0]: r[1:] for r in _github_rows(text.split("Cost per method")[0])}
    assert rows["dkd"][1] == "–" and rows["dkd"][0] != "–"
    assert "–: no finished run of this method on this pair" in text
    # ranked on the two pairs where it ran, and the table says so
    others = board[(board.kind == "method") & (board.label == "dkd")]
    ranked = [board[(board.pair == pair) & (board.kind == "method")].set_index("label")["mean"].rank(
        ascending=False)["dkd"] for pair in others.pair]
    assert rows["dkd"][-1] == f"{pd.Series(ranked).mean():.2f} ± {pd.Series(ranked).std():.2f} (2 pairs)"
    assert "mean rank: a method missing on some pairs is ranked on the pairs where it ran: dkd on 2 of 3." in text
    assert "no finished run" not in report.render_report(zoo_board, "github", layout="paper")
    one = board[~((board.pair != "vgg13->vgg8") & (board.label == "kd"))]  # kd on one pair: no std, one pair
    rows = {r[0]: r[1:] for r in _github_rows(report.render_report(one, "github", layout="paper").split("Cost")[0])}
    assert rows["kd"][-1].endswith(" (1 pair)")
    latex = report.render_report(board, "latex", layout="paper")
    assert re.search(r"\ndkd & [^\n]* & -- & ", latex) and "--: no finished run" in latex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="needs pdflatex (TeX Live)")
def test_paper_latex_compiles_in_a_plain_article(zoo_board, tmp_path):
    body = report.render_report(zoo_board, "latex", layout="paper")
    (tmp_path / "t.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                    + body + "\n\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "Overfull \\hbox" not in (tmp_path / "t.log").read_text(errors="replace"), "a table is wider than the page"


@pytest.mark.slow
def test_csv_holds_clean_numbers(capsys, tiny_results, tmp_path):  # noqa: F811
    for layout in ("leaderboard", "paper"):
        out = tmp_path / f"{layout}.csv"
        assert main(["report", "--results-dir", str(tiny_results), "--format", "csv", "--layout", layout,
                     "--out", str(out)]) == 0
        text = out.read_text()
        if layout == "leaderboard":  # p values keep four decimals: 0.0172
            p_values = pd.read_csv(out)[["p", "p_adjusted"]].stack().dropna()
            assert len(p_values) and (p_values == p_values.round(4)).all()
            text = pd.read_csv(out).drop(columns=["p", "p_adjusted"]).to_csv(index=False)
        assert not re.search(r"\d\.\d{3,}", text), f"float noise in the {layout} CSV"
    board = pd.read_csv(tmp_path / "leaderboard.csv").set_index("label")
    table = report.load_results(tiny_results)
    full = report.leaderboard(report.entries(table)).set_index("label")
    assert board.loc["kd", "mean"] == round(full.loc["kd", "mean"], 2)
    assert board.loc["kd", "peak_bytes"] == round(full.loc["kd", "peak_bytes"])
    paper = pd.read_csv(tmp_path / "paper.csv")
    assert list(paper.columns[:4]) == ["setting", "protocol", "label", "resnet14->resnet8 n"]
    counts = pd.read_csv(tmp_path / "paper.csv", dtype=str)["resnet14->resnet8 n"].dropna()
    assert set(counts) == {"1", "2"}  # printed as integers, not 1.0 / 2.0
    ranks = paper.set_index("label")[["mean_rank", "ranked_pairs", "pairs"]]
    assert list(ranks.loc["kd"]) == [1.0, 1, 1] and ranks.loc[["teacher", "student (CE)"], "mean_rank"].isna().all()
    # the tidy Parquet keeps full precision
    assert table["value"].map(lambda v: v != round(v, 2)).any()


def test_published_numbers_need_the_same_recipe(tiny_results):  # noqa: F811
    table = report.load_results(tiny_results)
    published = report.load_published(PUBLISHED)
    paper = _as_cifar100(table)
    board = report.leaderboard(report.entries(paper), "top1_last", published).set_index("label")
    assert board.loc["kd", "published"] == "70.66" and board.loc["kd", "published_mismatch"] == ""

    longer = report.leaderboard(report.entries(paper.assign(epochs=30)), "top1_last", published)
    assert (longer.published == "").all()
    assert "No published column: the published numbers were trained with recipe letkd-native or paper as " \
        "registered (this table overrides epochs=30)." in report.render_report(longer)
    other = report.leaderboard(report.entries(paper.assign(recipe="short")), "top1_last", published)
    assert "(this table: recipe short)" in report.render_report(other, layout="paper")
    fashion = report.leaderboard(report.entries(table), "top1_last", published)
    assert "the published numbers are CIFAR-100 results (this table: synthetic)" in report.render_report(fashion)


def test_styles_keep_25_methods_apart_and_families_together(zoo):
    group = report.entries(zoo)
    style = styles(group)
    methods = {label: s for label, s in style.items() if label in ZOO}
    assert len(methods) == 25
    assert len({(tuple(s.colour), s.marker) for s in methods.values()}) == 25
    assert {label: s.family for label, s in methods.items()} == ZOO
    # within a family, labels are contiguous (legend sections) and each has its own marker
    families = [s.family for s in style.values() if s.family in set(ZOO.values())]
    assert families == sorted(families, key=families.index)
    for family in set(ZOO.values()):
        markers = [s.marker for s in methods.values() if s.family == family]
        assert len(set(markers)) == len(markers)


def test_plots_of_25_methods(tmp_path):
    zoo = synthetic_table(pairs=PAIRS[:2])  # two pairs keep it quick; `python tests/synthetic_results.py` draws three
    written = report.save_plots(report.entries(zoo), zoo, tmp_path)
    assert len(written) == 12 and all(p.stat().st_size > 5000 for p in written)
    group = next(g for _, g in report.groups(report.entries(zoo)))
    heat = report.plot_heatmap(group)
    assert [ax.get_xticklabels()[0].get_text() for ax in heat.axes if ax.get_xticklabels()][:2] == [
        "resnet56->resnet20", "vgg13->vgg8"]
    mesh = heat.axes[0].collections[0]  # a diverging scale centred at 0, symmetric per pair
    assert mesh.norm.vmin == -mesh.norm.vmax
    stars = {}
    for correction in ("holm", "none"):  # * marks what the leaderboard marks: what survives the correction
        board = report.leaderboard(group, correction=correction)
        texts = report.plot_heatmap(group, correction=correction).axes[0].texts
        stars[correction] = sum(t.get_text().endswith("*") for t in texts)
        assert stars[correction] == board[(board.pair == "resnet56->resnet20")].delta_significant.sum()
    assert stars["holm"] < stars["none"]
    curves = report.plot_learning_curves(group, zoo)
    titles = [ax.get_title() for ax in curves.axes if ax.get_visible() and ax.get_title()]
    assert len(titles) == 2 * 5 and "resnet56->resnet20 · logit" in titles


def test_every_plot_marks_a_method_with_its_own_marker(zoo):
    """A method's marker is the same in every plot (the legend's): each drawn point is told apart by its colour."""
    from matplotlib.colors import to_hex

    group = next(g for _, g in report.plot_groups(report.entries(zoo)))
    by_colour = {to_hex(s.colour): (label, s.marker) for label, s in styles(group).items()}
    for fig in (report.plot_top1(group), report.plot_learning_curves(group, zoo)):
        drawn = [(to_hex(line.get_color()), line.get_marker()) for ax in fig.axes for line in ax.lines
                 if line.get_marker() not in ("None", "", None)]
        assert len(drawn) >= 25
        assert [(by_colour[c][0], m) for c, m in drawn if by_colour.get(c, (None, m))[1] != m] == []


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and re.fullmatch(r"kdbench \S+\n", capsys.readouterr().out)


def test_a_pair_without_published_numbers_says_so(tiny_results):  # noqa: F811
    """The setting matches (CIFAR-100, the paper recipe) but the published table has no row for the pair."""
    published = _as_cifar100(report.load_results(tiny_results))
    table = published.assign(student=published.student.replace({"resnet20": "resnet8"}),
                             pair=published.pair.replace({"resnet56->resnet20": "resnet56->resnet8"}),
                             run_id=published.run_id.where(published.role == "teacher", published.run_id + "-r8"))
    board = report.leaderboard(report.entries(table), "top1_last", report.load_published(PUBLISHED))
    line = "No published number in the table for resnet56->resnet8 (protocol crd)."
    assert line in report.render_report(board) and line in report.render_report(board, layout="paper")
    # beside a pair that has published numbers, in one table per setting: the column stays, the line names the other
    both = report.leaderboard(report.entries(pd.concat([published, table], ignore_index=True)), "top1_last",
                              report.load_published(PUBLISHED))
    text = report.render_report(both, by="setting")
    assert "published %" in text and re.search(r"\| kd +\|.*\| +70\.66 \|", text) and line in text
