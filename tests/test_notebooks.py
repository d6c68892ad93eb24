"""Execute both notebooks end to end (nbclient): they must run, fast, on a CPU."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["quickstart", "gaussianity"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HICACHE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # The per-cell timeout bounds the runtime; both notebooks take ~20-30 s on an idle 2-core CPU.
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    if name == "gaussianity":
        assert (tmp_path / "figures" / "kurtosis_heatmap.png").is_file()
        assert len(list((tmp_path / "trajectories").glob("*.safetensors"))) == 2
