"""Every notebook in notebooks/ runs top to bottom in a fresh kernel, and keeps its plots.

CI executes each one with nbclient (a cell that raises fails the test). The stored outputs are
what a code host shows; to refresh them after changing a notebook or the code it uses:

    python tests/docs/test_notebooks.py                  # re-executes every notebook in place
    python tests/docs/test_notebooks.py notebooks/01_bert_from_scratch.ipynb
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, also when run as a script
from conftest import MINILM_DIR, REPO_ROOT, require_module, require_path  # noqa: E402

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # a runaway cell fails instead of hanging CI; the notebooks take a few minutes in all


def execute(path: Path):
    """Run a notebook in a fresh python3 kernel with notebooks/ as the working folder; returns it with outputs."""
    nbformat = require_module("nbformat")
    nbclient = require_module("nbclient")
    require_module("ipykernel")
    require_module("matplotlib")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the cell and the traceback
    return notebook


def has_plot(cell) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 2, f"expected the notebooks in {REPO_ROOT / 'notebooks'}, found {NOTEBOOKS}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_a_fresh_kernel(path, shared_data):
    require_path(MINILM_DIR / "model.safetensors", "all-MiniLM-L6-v2 checkpoint")
    notebook = execute(path)
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert any(has_plot(cell) for cell in notebook.cells), f"{path.name} produced no plot"


def test_stored_notebooks_keep_their_plots():
    """What a code host shows: the committed notebooks carry their executed outputs, plots included."""
    nbformat = require_module("nbformat")
    with_plots = [path.name for path in NOTEBOOKS if any(has_plot(c) for c in nbformat.read(path, as_version=4).cells)]
    unexecuted = [path.name for path in NOTEBOOKS
                  if any(c.cell_type == "code" and c.source.strip() and c.get("execution_count") is None
                         for c in nbformat.read(path, as_version=4).cells)]
    assert not unexecuted, f"stored without outputs (run `python tests/docs/test_notebooks.py`): {unexecuted}"
    assert len(with_plots) == len(NOTEBOOKS), f"only {with_plots} of {[p.name for p in NOTEBOOKS]} keep plots"


if __name__ == "__main__":
    import time

    import nbformat

    for path in [Path(p).resolve() for p in sys.argv[1:]] or NOTEBOOKS:
        start = time.perf_counter()
        nbformat.write(execute(path), path)
        print(f"{path.relative_to(REPO_ROOT)}: executed in {time.perf_counter() - start:.0f} s")
