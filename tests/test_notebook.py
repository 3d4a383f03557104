"""The notebooks run top to bottom (shortened) and show their curves and results tables."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK = NOTEBOOKS / "codistill_quickstart.ipynb"
LORA_NOTEBOOK = NOTEBOOKS / "codistill_lora_one_base.ipynb"


@pytest.mark.parametrize("path", [NOTEBOOK, LORA_NOTEBOOK], ids=["quickstart", "lora_one_base"])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code")


def markdown_tables(notebook) -> list[str]:
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    return [output["data"]["text/markdown"] for output in outputs if "text/markdown" in output.get("data", {})]


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
    tables = markdown_tables(notebook)
    assert len(tables) == 1
    rows = {line.split("|")[1].strip(): line for line in tables[0].splitlines() if line.startswith("| ")}
    assert {"codistilled", "independent"} <= set(rows)
    for name in ("codistilled", "independent"):
        accuracy_0, accuracy_1, ensemble, agreement = (float(v) for v in rows[name].strip("| ").split("|")[1:])
        assert all(0.0 <= value <= 1.0 for value in (accuracy_0, accuracy_1, ensemble, agreement))


@pytest.mark.slow
def test_four_lora_students_notebook_runs_on_one_base(tmp_path, monkeypatch):
    """Four LoRA students of the pre-trained MiniLM on BBC News, shortened to 6 steps: the memory table shows one
    base, the results table every student, and a saved student loads with `PeftModel.from_pretrained`."""
    for name, value in {"LORA_NOTEBOOK_STEPS": "6", "LORA_NOTEBOOK_MAX_LENGTH": "32",
                        "LORA_NOTEBOOK_EVAL_SAMPLES": "32", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(LORA_NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    memory, results = markdown_tables(notebook)
    held = {line.split("|")[1].strip(): float(line.split("|")[2].strip().split()[0])
            for line in memory.splitlines()[2:]}
    base = held["base model (once)"]
    assert 22 < base < 23.5  # all-MiniLM-L6-v2 and its classifier, once
    assert held["all held: base + 4 students + 4 peers"] < 1.1 * base
    rows = {line.split("|")[1].strip(): [float(v) for v in line.strip("| ").split("|")[1:]]
            for line in results.splitlines()[2:]}
    assert set(rows) == {"codistilled", "independent"}
    assert all(0.0 <= value <= 1.0 for values in rows.values() for value in values)
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert "adapter_model.safetensors" in printed and "->" in printed
