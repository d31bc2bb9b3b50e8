"""Every notebook's code runs (short settings, no display)."""

import glob
import json
import os

import pytest

pytest.importorskip("sklearn")
matplotlib = pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.setenv("NOTEBOOK_EPOCHS", "2")
  monkeypatch.chdir(os.path.dirname(path))
  with open(path) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  namespace = {"__name__": "__notebook__"}
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    exec(compile(source, f"{os.path.basename(path)}[cell {i}]", "exec"),  # pylint: disable=exec-used
         namespace)
  matplotlib.pyplot.close("all")
