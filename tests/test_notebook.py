"""The Colab notebook runs top to bottom on CPU with the tiny config, without network."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "simpo_jax_colab.ipynb"), as_version=4)
    monkeypatch.setenv("SIMPO_NOTEBOOK_STEPS", "20")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as on a laptop
    monkeypatch.delenv("HF_TOKEN", raising=False)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "held-out reward accuracy by step" in outputs
    assert "loaded by transformers" in outputs
    assert "Set HF_TOKEN" in outputs
