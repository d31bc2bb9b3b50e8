"""Every notebook runs top to bottom in a real Jupyter kernel (SMALL setting).

Each notebook is executed headless by ``nbclient`` in an ``ipykernel``
``python3`` kernel, with ``OPTAX_SAM_SMALL=1`` (a few dozen steps) and this
checkout first on the kernel's ``PYTHONPATH`` (so the notebooks' install cell
is skipped and they test this code); a cell that raises fails the test. The
notebooks are committed without outputs.
"""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "nnx.ipynb", "layers_and_masks.ipynb",
          "data_parallel.ipynb", "results.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"cell {i} has outputs: strip them"
      assert cell.execution_count is None, f"cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv("OPTAX_SAM_SMALL", "1")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline one
  # The kernel inherits conftest.py's XLA_FLAGS (LLVM's optimization level
  # 0: compilation is most of a SMALL run).
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()  # raises CellExecutionError when a cell fails
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if o.output_type == "error"]
  assert not errors
