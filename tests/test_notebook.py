"""The quick-start notebook runs top to bottom (shortened to one epoch) and shows its curves and results table."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "codistill_quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code")


def test_quickstart_notebook_runs_and_shows_curves_and_table(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_EPOCHS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the failing cell and traceback, if any cell fails.
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs)
    tables = [output["data"]["text/markdown"] for output in outputs if "text/markdown" in output.get("data", {})]
    assert len(tables) == 1
    rows = {line.split("|")[1].strip(): line for line in tables[0].splitlines() if line.startswith("| ")}
    assert {"codistilled", "independent"} <= set(rows)
    for name in ("codistilled", "independent"):
        accuracy_0, accuracy_1, ensemble, agreement = (float(v) for v in rows[name].strip("| ").split("|")[1:])
        assert all(0.0 <= value <= 1.0 for value in (accuracy_0, accuracy_1, ensemble, agreement))
