"""Every notebook in notebooks/ runs top to bottom headless (nbclient) at its tiny preset; a cell
that raises fails. Each trains or compiles a tiny model (about one to two minutes each on 2
cores); the kernels share the suite's persistent compilation cache (conftest). The quick start
and the architecture tour run in the default suite; the fine-tuning and ablation notebooks (3.2
min together) are `slow`, which keeps the default suite's time down. The committed notebooks
carry no outputs (checked here, fast)."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "*.ipynb")))


def test_notebooks_exist_and_are_stripped():
  assert NOTEBOOKS
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert 'PRESET = "tiny"' in code[0].source, path
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path}: outputs"


HEAVY = ("03_finetune.ipynb", "04_ablations.ipynb")


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow)
                                  if os.path.basename(p) in HEAVY else p for p in NOTEBOOKS],
                         ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_headless(path):
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  env = {"cwd": ROOT}
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": env["cwd"]}}).execute()
