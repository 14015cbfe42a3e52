"""The committed notebook narrates (short cells, no logic of its own) and shows no warnings."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "S9.ipynb"
CELLS = json.loads(NOTEBOOK.read_text())["cells"]
CODE = ["".join(cell["source"]) for cell in CELLS if cell["cell_type"] == "code"]


def output_text(cell: dict) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append("".join(output.get("text", "")))
        parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "".join(parts)


@pytest.mark.parametrize("source", CODE)
def test_cells_call_the_modules_instead_of_defining_logic(source: str) -> None:
    lines = [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 14, source
    assert not any(line.startswith(("def ", "class ")) for line in lines), source


def test_committed_outputs_show_no_warnings_or_errors() -> None:
    for cell in CELLS:
        if cell["cell_type"] != "code":
            continue
        assert not any(o["output_type"] == "error" for o in cell.get("outputs", [])), cell["source"]
        assert not any(o.get("name") == "stderr" and "Warning" in "".join(o.get("text", ""))
                       for o in cell.get("outputs", [])), cell["source"]
        assert "Warning" not in output_text(cell), cell["source"]


def test_the_brief_table_is_checked_by_nbval() -> None:
    checked = [s for s in CODE if "NBVAL_CHECK_OUTPUT" in s]
    assert any("check_brief" in s for s in checked)
