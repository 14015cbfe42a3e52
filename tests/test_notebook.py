"""The committed notebook narrates (short cells, no logic), shows no warnings, holds a real run;
its Colab setup cell survives reruns and restarts."""

import importlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from model import Net, check_brief, receptive_field_table
from utils import format_table

NOTEBOOK = Path(__file__).resolve().parent.parent / "S9.ipynb"
README = NOTEBOOK.parent / "README.md"
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
        stderr = "".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                         if o.get("name") == "stderr")
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, cell["source"]


WIDGET = "application/vnd.jupyter.widget-view+json"
STRIP_WIDGETS = (
    "python -c \"import nbformat as n; nb = n.read('S9.ipynb', 4); nb.metadata.pop('widgets', None); "
    "[setattr(c, 'outputs', [o for o in c.outputs if '" + WIDGET + "' not in o.get('data', {})]) "
    "for c in nb.cells if c.cell_type == 'code']; n.write(nb, 'S9.ipynb')\""
)


def test_committed_outputs_hold_no_progress_bar_widgets() -> None:
    # A stored widget renders only its text fallback, "epoch 1:   0%|", between the epoch lines.
    notebook = json.loads(NOTEBOOK.read_text())
    widgets = [o for cell in CELLS for o in cell.get("outputs", []) if WIDGET in o.get("data", {})]
    assert not widgets and "widgets" not in notebook["metadata"], (
        f"S9.ipynb stores {len(widgets)} progress-bar widgets: after a headless rerun, drop them "
        f"with {STRIP_WIDGETS}"
    )


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


def test_committed_outputs_come_from_a_full_run_on_full_cifar10() -> None:
    data_report = stored_output("load_splits(")
    assert "synthetic" not in data_report
    assert "CIFAR-10 python batches" in data_report
    assert "50,000 training and 10,000 test images" in data_report
    assert "smoke run: False" in stored_output("check_accelerator(")
    summary = stored_output("history.summary(")
    assert "(epoch 60)" in summary, "the stored run trained the notebook's default 60 epochs"
    assert "of 10,000 test images misclassified" in stored_output("misclassified(")


# ----------------------------------------------------------------------------- Colab setup


def source_of(call: str) -> str:
    """The source of the one code cell that contains `call`."""
    (source,) = [s for s in CODE if call in s]
    return source


SETUP = source_of("REPO_URL =")
# Until the placeholder path is replaced, the cell stops before cloning; runs below use a real one.
RUNNABLE_SETUP = SETUP.replace("github.com/OWNER/REPO.git", "github.com/student/s9.git")
REPO_URL_PATH = re.compile(r'REPO_URL = "https://github\.com/([\w.-]+/[\w.-]+)\.git"')
BADGE_PATH = re.compile(
    r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/S9\.ipynb"
)


def test_colab_badge_and_setup_cell_name_the_same_repository() -> None:
    (cell_path,) = REPO_URL_PATH.findall(SETUP)
    badge_paths = BADGE_PATH.findall(README.read_text())
    assert badge_paths, "the README has no Open-in-Colab badge"
    assert set(badge_paths) == {cell_path}, "the README badge and REPO_URL name different repos"


class FakeColab:
    """Runs the setup cell as Colab would, with git and pip replaced by a fake clone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, content: Path) -> None:
        self.calls: list[str] = []
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
        monkeypatch.setattr(subprocess, "run", self.run)
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.delitem(sys.modules, "s9_probe", raising=False)
        monkeypatch.chdir(content)

    def run(self, args: list[str], check: bool = False) -> subprocess.CompletedProcess:
        if args[:2] == ["git", "clone"]:
            self.calls.append("clone")
            Path(args[-1]).mkdir()  # git refuses an existing folder; mkdir does too
            for name in ("model.py", "requirements.txt"):
                (Path(args[-1]) / name).write_text("")
            (Path(args[-1]) / "s9_probe.py").write_text("CLONED = True\n")
        else:
            assert args[1:4] == ["-m", "pip", "install"] and Path("requirements.txt").exists(), args
            self.calls.append("pip")
        return subprocess.CompletedProcess(args, 0)

    def run_cell(self, source: str = RUNNABLE_SETUP) -> None:
        exec(compile(source, "setup-cell", "exec"), {})


def test_setup_cell_survives_reruns_and_restarts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    colab = FakeColab(monkeypatch, tmp_path)  # tmp_path plays /content
    colab.run_cell()  # a fresh VM
    assert Path.cwd() == tmp_path / "s9" and colab.calls == ["clone", "pip"]
    assert sys.path[0] == str(tmp_path / "s9")
    importlib.invalidate_caches()
    assert importlib.import_module("s9_probe").CLONED, "the clone's modules import"
    colab.run_cell()  # rerun, cwd already inside the clone
    assert Path.cwd() == tmp_path / "s9" and colab.calls == ["clone", "pip"]
    os.chdir(tmp_path)  # Runtime -> Restart: the kernel starts again in /content
    for _ in range(2):
        colab.run_cell()
        assert Path.cwd() == tmp_path / "s9" and colab.calls == ["clone", "pip"]
        assert sys.path[0] == str(tmp_path / "s9")


def test_setup_cell_retries_an_install_that_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    colab = FakeColab(monkeypatch, tmp_path)
    clone_or_install = colab.run

    def pip_fails_once(args: list[str], check: bool = False) -> subprocess.CompletedProcess:
        if "pip" in args and "pip" not in colab.calls:
            colab.calls.append("pip")
            raise subprocess.CalledProcessError(1, args)
        return clone_or_install(args, check)

    monkeypatch.setattr(subprocess, "run", pip_fails_once)
    with pytest.raises(subprocess.CalledProcessError):
        colab.run_cell()
    colab.run_cell()
    assert Path.cwd() == tmp_path / "s9" and colab.calls == ["clone", "pip", "pip"]


def test_setup_cell_stops_on_the_placeholder_repository(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    colab = FakeColab(monkeypatch, tmp_path)
    (cell_path,) = REPO_URL_PATH.findall(SETUP)
    placeholder = SETUP.replace(f"github.com/{cell_path}.git", "github.com/OWNER/REPO.git")
    with pytest.raises(SystemExit, match="Set REPO_URL"):
        colab.run_cell(placeholder)
    assert colab.calls == [] and Path.cwd() == tmp_path


def test_setup_cell_outside_colab_only_puts_the_folder_on_sys_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    colab = FakeColab(monkeypatch, tmp_path)
    monkeypatch.delitem(sys.modules, "google.colab")
    colab.run_cell()
    assert colab.calls == [] and Path.cwd() == tmp_path and sys.path[0] == str(tmp_path)
    assert sorted(tmp_path.iterdir()) == []


def test_settings_default_to_a_gpu_run_with_local_checkpoints() -> None:
    settings = source_of("USE_DRIVE =")
    for line in ("ALLOW_CPU = False", "USE_DRIVE = False", "RESUME = False"):
        assert re.search(rf"^{line}\b", settings, re.M), line
    assert "drive_checkpoint_dir() if USE_DRIVE" in settings
    device = source_of("check_accelerator(")
    assert "allow_cpu=ALLOW_CPU or SMOKE" in device, "smoke runs (CI) must never stop on the check"
