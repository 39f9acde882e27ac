"""The notebooks in ``notebooks/`` run top to bottom, use the public API only, and ship without outputs.

Each notebook is executed with nbclient on the ``python3`` kernel, in the notebook's own folder, on its
small defaults and the real (cached) data. What a run writes goes to a temporary folder (the notebooks
read ``PRIVFL_NOTEBOOK_OUT``), and the executed copy is written there too, never into the repository.
The kernel runs without ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, as a user's would: the library sets
its own thread policy (one torch thread, see ``fedcore.Federation``), so no variable is needed.
Deselect these tests with ``-k "not notebook"``.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
REQUIRED = (
    "01_quickstart.ipynb",
    "02_secure_aggregation.ipynb",
    "03_privacy_budget_report.ipynb",
    "04_recommender_movielens.ipynb",
)
CELL_TIMEOUT_S = 600
# A private module of our packages, or a private attribute of anything (``obj._name``, not dunders).
PRIVATE = re.compile(r"\b(?:fedcore|secagg|dp)(?:\.\w+)*\._\w|\._(?!_)\w")


def _code(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_the_four_notebooks_of_the_issue_exist():
    assert {p.name for p in NOTEBOOKS} >= set(REQUIRED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stale, f"{path.name}: code cells {stale} carry outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_the_public_api_only(path):
    nb = nbformat.read(path, as_version=4)
    hits = [m.group(0) for source in _code(nb) for m in PRIVATE.finditer(source)]
    assert not hits, f"{path.name} reaches private names: {hits}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVFL_NOTEBOOK_OUT", str(tmp_path / "outputs"))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    before = _tree(FOLDER)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on the first error
    finally:
        nbformat.write(nb, tmp_path / path.name)  # the executed copy, for inspection
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells), "every code cell ran"
    outputs = [o for c in code_cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} drew no figure"
    assert _tree(FOLDER) == before, "the notebook wrote into the repository's notebooks/ folder"
