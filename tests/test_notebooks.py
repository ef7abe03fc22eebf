"""The teaching notebooks run top to bottom, and are committed without outputs.

Each notebook executes in a fresh kernel of this very interpreter (not whatever
``python3`` kernelspec Jupyter finds first), with ``LAB_NOTEBOOK_SMALL=1``: the
notebooks read it to cut prompts, tokens and batch sizes and to use SmolLM2 only.
A cell error fails the test with the cell's traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import tiny_tokenizer
from lab.display import shown_tokens, tokens_html
from lab.trace import Step

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # a generous bound per cell on a loaded shared machine; a hang still fails


def _step(index, drafted, num_accepted, emitted, final_kind):
    return Step(index, tuple(drafted), num_accepted, tuple(emitted), final_kind, 0.0, 0.0, 0)


@pytest.mark.parametrize(
    "step, expected",
    [
        # two of three drafted tokens kept, the third refused and replaced by the target's own
        (_step(0, [5, 6, 7], 2, [5, 6, 9], "corrected"),
         [("t5", "accepted"), ("t6", "accepted"), ("t7", "rejected"), ("t9", "corrected")]),
        # a fully accepted draft earns the bonus token
        (_step(0, [5, 6], 2, [5, 6, 8], "bonus"), [("t5", "accepted"), ("t6", "accepted"), ("t8", "bonus")]),
        # no draft: one plain target token
        (_step(0, [], 0, [4], "target"), [("t4", "target")]),
        # cut by the budget after the accepted tokens: no rejected or corrected token is shown
        (_step(0, [5, 6, 7], 1, [5], "corrected"), [("t5", "accepted")]),
    ],
)
def test_shown_tokens_classes(step, expected):
    """The coloured-token helper the notebooks use: one class per token, in reading order."""
    tokenizer = tiny_tokenizer()
    shown = shown_tokens([step], tokenizer, prompt_ids=[2, 3])
    assert [(t.text.strip(), t.kind) for t in shown] == expected
    html = tokens_html(shown)
    assert html.count("<span") == len(expected)
    assert ("line-through" in html) == any(kind == "rejected" for _, kind in expected)


def test_every_lesson_has_its_notebook():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_draft_verify_repeat",
        "02_acceptance_and_speedup",
        "03_when_it_hurts",
        "04_exactness_of_sampling",
        "05_structured_output",
        "06_quantised_drafts",
        "07_trained_heads",
        "08_map_your_workload",
        "09_moe_trap",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    """Outputs hold machine-specific numbers and megabytes of plotly: strip them before committing
    (Jupyter: Edit > Clear Outputs of All Cells, or ``jupyter nbconvert --clear-output --inplace``)."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_and_closes_with_prose(path):
    """What it teaches first, what to take away last."""
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].cell_type == "markdown" and "teaches" in cells[0].source.lower()
    assert cells[-1].cell_type == "markdown" and "take away" in cells[-1].source.lower()


@pytest.fixture
def kernel_manager(tmp_path):
    """A kernel manager that starts ``sys.executable -m ipykernel_launcher`` whatever kernelspecs are installed."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "python3")  # its argv starts with sys.executable
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    spec = specs.get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable, spec.argv
    manager = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
    yield manager
    # nbclient shuts down only the kernels it made; left alive, each kept its models (0.3-2 GB) to the end
    if manager.has_kernel:
        from jupyter_core.utils import run_sync

        run_sync(manager.shutdown_kernel)(now=True)


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_small_mode(path, kernel_manager, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("LAB_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        km=kernel_manager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, json.dumps(errors, indent=1)[:4000]
