"""Execute every tutorial notebook (tutorials/NN_*.py, jupytext percent format) in a fresh
kernel and fail on any cell error.

Each notebook is converted with jupytext and run by nbclient with the current interpreter
(the venv's Python: jupyter_client starts kernel specs whose command is ``python`` with
``sys.executable``), with the tutorials folder as working directory. The notebooks are
written at tiny sizes (the table model, random tiny transformers, stories260K), so each
runs in 20-60 s on two CPU cores (all six: about 3.5 minutes; ``-m "not slow"``: about 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))

#: Notebooks that run longer (real-model training): still run by ``make test`` and CI.
SLOW = {"04_learning_twists.py", "06_realignment_and_negative_training.py"}

#: Wall-clock limit per cell (generous: the build machines' 2 cores may be shared).
CELL_TIMEOUT = 600


def _params():
    for path in NOTEBOOKS:
        marks = [pytest.mark.slow] if path.name in SLOW else []
        yield pytest.param(path, id=path.stem, marks=marks)


def test_tutorials_exist():
    assert NOTEBOOKS, f"no tutorials found in {TUTORIALS}"


@pytest.mark.parametrize("path", list(_params()))
def test_tutorial_runs(path: Path, tmp_path: Path, monkeypatch):
    notebook = jupytext.read(path)
    # The kernel must be this interpreter (the venv's): jupyter_client replaces a kernel
    # command "python" by sys.executable, and PATH leads with the venv's bin as well.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # Notebooks written for a real model (07: SmolLM2) switch to a tiny random one.
    monkeypatch.setenv("LMPPL_TUTORIAL_SIZE", "tiny")
    # The kernel keeps compiled programs on disk like the rest of the suite (conftest's
    # threshold reaches it through the environment): a cell run before the notebook's own.
    notebook.cells.insert(
        0, nbformat.v4.new_code_cell("import lmppl\nlmppl.enable_compilation_cache()")
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
    finally:
        out = os.environ.get("LMPPL_TUTORIALS_OUT")
        if out:  # keep the executed notebook for inspection
            Path(out).mkdir(parents=True, exist_ok=True)
            jupytext.write(notebook, Path(out) / f"{path.stem}.ipynb")
