"""Every tutorial notebook runs top to bottom in a fresh kernel, explains itself in prose, shows
the plots it promises, and is stored with the outputs of a complete run."""
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = pathlib.Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))

# the tutorials the issue asks for; each must exist
EXPECTED = ["01_first_sharded_mlp", "02_self_attention", "03_huggingface_gpt2",
            "04_layouts_and_redistribution", "05_checkpoints", "06_custom_rule"]
# notebooks that promise a plot: at least one image output each
PLOTS = {"01_first_sharded_mlp", "03_huggingface_gpt2", "04_layouts_and_redistribution"}


def _images(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))


def _prose_words(nb) -> int:
    return sum(len(c.source.split()) for c in nb.cells if c.cell_type == "markdown")


def test_every_tutorial_is_there():
    missing = set(EXPECTED) - {p.stem for p in NOTEBOOKS}
    assert not missing, missing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_has_prose_and_saved_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(markdown) >= 4 and _prose_words(nb) >= 400, "a tutorial explains itself in prose"
    assert markdown[0].source.startswith("# "), "the first cell is a titled introduction"
    # stored as one complete run, in order, with no errors
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not saved from a top-to-bottom run: {counts}"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert sum(1 for c in code if c.outputs) >= len(code) // 2, "outputs are saved in the file"
    if path.stem in PLOTS:
        assert _images(nb) >= 1, "the promised plot is stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    # a fresh kernel; any cell that raises fails the test (CellExecutionError names the cell)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(TUTORIALS)}}).execute()
    if path.stem in PLOTS:
        assert _images(nb) >= 1, "the plot is rendered"
