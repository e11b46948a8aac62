"""notebooks/analysis.ipynb runs top to bottom on a real tiny results table."""

from pathlib import Path

import pytest
from test_report import tiny_results  # noqa: F401  (the session's tiny sweep, built once)

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


@pytest.mark.slow
def test_analysis_notebook_runs_top_to_bottom(tiny_results, monkeypatch):  # noqa: F811
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("KDBENCH_RESULTS", str(tiny_results))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| student resnet8 (CE) " in text and "Not counted (2 runs did not finish)" in text
    # kd against the CE student by default, in every table that holds both, with the leaderboard's adjusted p
    assert "1 comparison(s) of kd with student" in text
    assert "kd − student (top1_best):" in text and "over n = 2 seeds" in text and "Holm-adjusted p = " in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 7  # six report plots + the paired one


def test_the_committed_notebook_shows_the_outputs_of_a_committed_set():
    """`make notebook` executed it in place: a reader sees the tables and plots of a set in the repository."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count and cell.outputs for cell in code), "run `make notebook` and commit the result"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # top to bottom, once
    first = code[0].outputs[0]["text"]
    results = first.split(":")[0]
    assert results.startswith("../results/reference-") and (NOTEBOOK.parent / results / "metrics.parquet").is_file()
    assert not any(o.get("output_type") == "error" for cell in code for o in cell.outputs)
    assert sum("image/png" in o.get("data", {}) for cell in code for o in cell.outputs) >= 7
    # the leaderboard marks its artefacts as `kdbench report` does (the first set's runs stop while improving)
    markdown = "\n".join(o.get("data", {}).get("text/markdown", "") for cell in code for o in cell.outputs)
    assert "| kd [e] " in markdown and "[e] best epoch = last epoch" in markdown
