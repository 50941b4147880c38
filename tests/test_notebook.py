"""The quick-start notebook runs top to bottom on a tiny saved pipeline (so it never rots)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from dreampainter.toy.pipeline import build_tiny_pipeline

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes_on_a_tiny_pipeline(tmp_path, monkeypatch):
    build_tiny_pipeline(tmp_path / "tokenizer").save_pretrained(tmp_path / "pipe")
    monkeypatch.setenv("DREAMPAINTER_PIPELINE", str(tmp_path / "pipe"))
    monkeypatch.setenv("DREAMPAINTER_SIZE", "48")
    monkeypatch.setenv("DREAMPAINTER_STEPS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    ]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "reference adapter: True" in text
    assert "product pixels preserved in 3 images" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 3  # the input grid, the text-only result, the reference grid


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells)


@pytest.fixture(autouse=True)
def _quiet_kernel(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
