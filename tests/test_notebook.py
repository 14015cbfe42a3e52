"""The committed notebook narrates (short cells, no logic), shows no warnings, holds a real run."""

import json
from pathlib import Path

import pytest

from model import Net, check_brief, receptive_field_table
from utils import format_table

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


def test_the_brief_and_receptive_field_tables_are_checked_by_nbval() -> None:
    checked = [s for s in CODE if "NBVAL_CHECK_OUTPUT" in s]
    assert any("check_brief" in s for s in checked)
    assert any("receptive_field_table" in s for s in checked)


def stored_output(call: str) -> str:
    """The committed stdout of the one code cell that contains `call`."""
    (cell,) = [c for c in CELLS if c["cell_type"] == "code" and call in "".join(c["source"])]
    return output_text(cell)


def test_stored_brief_and_receptive_field_tables_match_the_model() -> None:
    net = Net()
    assert stored_output("check_brief(") == format_table(check_brief(net)) + "\n"
    assert stored_output("receptive_field_table(") == format_table(receptive_field_table(net)) + "\n"
    assert "| NO " not in stored_output("check_brief(")


def test_committed_outputs_come_from_a_full_run_on_real_images() -> None:
    data_report = stored_output("load_splits(")
    assert "synthetic" not in data_report
    assert "CIFAR-10 python batches" in data_report
    assert "smoke run: False" in stored_output("seed_everything(SEED)")
    summary = stored_output("history.summary(")
    assert "(epoch 60)" in summary, "the stored run trained the notebook's default 60 epochs"
