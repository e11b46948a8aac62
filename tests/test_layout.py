"""The code stays in modules a reader can hold: none in kdbench/ or methods/ over 500 lines."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted([*ROOT.joinpath("kdbench").rglob("*.py"), *ROOT.joinpath("methods").glob("*.py")])


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500
