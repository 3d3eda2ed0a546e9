"""docs/researcher-loop.ipynb runs top to bottom in a real Jupyter kernel (nbclient), and
shows what docs/notebooks.md says it shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
NOTEBOOK = REPO / "docs" / "researcher-loop.ipynb"


def test_the_documented_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("3 claims: 3 passed" in page and "status-filter" in page for page in html)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "# Frozen from harness.check" in text and "flips_sign: true" in text
    assert "3 claims: 3 passed" in text          # the frozen spec, checked again
