"""Every chapter's "On a GPU" cells run, on the SD-1.5-layout tiny pipeline.

For each chapter in ``chapters/**/*.ipynb``, the code cells tagged ``gpu`` (cell metadata
``tags``) are put, alone and in order, into a new notebook that a fresh Jupyter kernel (the
project's own Python, via ``nbclient``) executes in the chapter's folder with

    DIFFNOTES_SIMULATE_GPU=1  HF_HUB_OFFLINE=1  TQDM_DISABLE=1  DIFFNOTES_STATIC=1

(and one CPU thread). With the switch, ``has_gpu()`` is True and ``load_pipeline("sd-1.5")``
returns the randomly initialised ``"sd-1.5-layout-tiny"`` pipeline, so the code that a Colab
user runs is executed on every build. A cell passes when it raises nothing and prints no skip
message ("Skipped"); a chapter without a ``gpu`` cell fails. Per-cell wall times are printed
(``pytest -s``); a cell over :data:`CELL_LIMIT_S` (default 120 s, env
``DIFFNOTES_GPU_CELL_LIMIT_S``) fails. The chapters' budget is 20 s on one thread; wall time in a
fresh kernel includes importing diffusers (several seconds), and a loaded CI machine stretches
it, so the limit only catches gross regressions (e.g. a cell that forgot to cut its steps).
"""
from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted(p for p in (ROOT / "chapters").glob("**/*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)
TAG = "gpu"
SKIP_MARK = "Skipped"
#: environment of the kernel, on top of the test process's own
SIM_ENV = {"DIFFNOTES_SIMULATE_GPU": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "DIFFNOTES_STATIC": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
#: a cell running longer than this (seconds) fails; nbclient's own timeout is a bit above it
CELL_LIMIT_S = float(os.environ.get("DIFFNOTES_GPU_CELL_LIMIT_S", "120"))
TIMINGS: list[tuple[str, int, float]] = []   # (chapter, cell index, seconds), for the summary


# ---------------------------------------------------------------------------- the harness
def gpu_cells(nb) -> list[tuple[int, object]]:
    """``(index in the chapter, cell)`` of the code cells tagged ``gpu``."""
    return [(i, c) for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and TAG in c.get("metadata", {}).get("tags", [])]


def gpu_notebook(nb):
    """A new notebook made of ``nb``'s ``gpu`` cells only (outputs cleared), same kernelspec."""
    cells = []
    for i, c in gpu_cells(nb):
        new = nbformat.v4.new_code_cell(c.source, metadata={"tags": [TAG], "chapter_index": i})
        cells.append(new)
    out = nbformat.v4.new_notebook(cells=cells)
    out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                  "language": "python"}
    return out


def output_text(cell) -> str:
    """Everything a cell showed as text: streams, text/plain results and error tracebacks."""
    parts = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            parts.append(str(o.get("data", {}).get("text/plain", "")))
        elif o.output_type == "error":
            parts.append(f"{o.ename}: {o.evalue}\n" + "\n".join(o.traceback))
    return "".join(parts)


def _seconds(cell) -> float | None:
    ex = cell.get("metadata", {}).get("execution", {})
    a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
    if not (a and b):
        return None
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(b) - parse(a)).total_seconds()


def run_gpu_cells(path: Path, timeout: float | None = None):
    """Execute ``path``'s ``gpu`` cells in a fresh kernel under the simulation switch.

    Returns ``(executed notebook, error)`` where ``error`` is ``None`` or the
    ``CellExecutionError``/timeout that stopped the run (the executed notebook then holds the
    outputs up to and including the failing cell)."""
    nb = gpu_notebook(nbformat.read(str(path), as_version=4))
    client = nbclient.NotebookClient(
        nb, timeout=timeout or CELL_LIMIT_S + 60, kernel_name="python3", record_timing=True,
        resources={"metadata": {"path": str(path.parent)}}, allow_errors=False)
    env = {**os.environ, **SIM_ENV}
    # the kernel is this interpreter (the project's .venv), with the repository importable
    # ("python3": jupyter_client starts it with sys.executable, i.e. the interpreter running pytest)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    try:
        client.execute(env=env)
        return nb, None
    except Exception as err:  # CellExecutionError, DeadKernelError, CellTimeoutError
        return nb, err


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ---------------------------------------------------------------------------- the tests
@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS, ids=_rel)
def test_gpu_cells_run_simulated(chapter):
    src = nbformat.read(str(chapter), as_version=4)
    cells = gpu_cells(src)
    assert cells, (f"{_rel(chapter)} has no cell tagged 'gpu': every chapter needs an "
                   f"'On a GPU' cell (see the GPU-cell convention)")
    t0 = time.perf_counter()
    nb, err = run_gpu_cells(chapter)
    total = time.perf_counter() - t0
    problems = []
    for (idx, _), cell in zip(cells, nb.cells):
        secs = _seconds(cell)
        text = output_text(cell)
        ran = secs is not None
        print(f"\n[gpu cell] {_rel(chapter)} cell {idx}: "
              f"{f'{secs:.1f} s' if ran else 'not run'}", end="")
        if ran:
            TIMINGS.append((_rel(chapter), idx, secs))
        if any(o.output_type == "error" for o in cell.get("outputs", [])):
            problems.append(f"cell {idx} raised:\n{text[-3000:]}")
        elif SKIP_MARK in text:
            problems.append(f"cell {idx} printed the skip message (has_gpu() was not True under "
                            f"DIFFNOTES_SIMULATE_GPU=1, or the cell is gated on something else):"
                            f"\n{text[-1000:]}")
        elif ran and secs > CELL_LIMIT_S:
            problems.append(f"cell {idx} took {secs:.1f} s (> {CELL_LIMIT_S:.0f} s)")
    print(f"\n[gpu cells] {_rel(chapter)}: {len(cells)} cell(s), {total:.1f} s with kernel start")
    if err is not None and not problems:
        problems.append(f"{type(err).__name__}: {str(err)[-3000:]}")
    assert not problems, f"{_rel(chapter)}: " + "\n".join(problems)


@pytest.mark.slow
def test_harness_on_a_scratch_notebook(tmp_path):
    """The harness itself: selects only tagged cells, sets the switch, catches skip messages."""
    cells = [
        nbformat.v4.new_code_cell("raise RuntimeError('the rest of the chapter must not run')"),
        nbformat.v4.new_code_cell(
            "from diffnotes.utils import has_gpu\n"
            "import os\n"
            "if has_gpu():\n"
            "    print('simulated', os.environ['DIFFNOTES_SIMULATE_GPU'], os.getcwd())\n"
            "else:\n"
            "    print('Skipped: no GPU.')\n", metadata={"tags": ["gpu"]}),
        nbformat.v4.new_markdown_cell("text", metadata={"tags": ["gpu"]}),
        nbformat.v4.new_code_cell("print('Skipped: on purpose')", metadata={"tags": ["gpu"]}),
    ]
    path = tmp_path / "scratch.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), str(path))
    src = nbformat.read(str(path), as_version=4)
    assert [i for i, _ in gpu_cells(src)] == [1, 3]
    nb, err = run_gpu_cells(path, timeout=120)
    assert err is None, err
    assert output_text(nb.cells[0]).startswith(f"simulated 1 {tmp_path}")
    assert SKIP_MARK in output_text(nb.cells[1])
    assert all(_seconds(c) is not None for c in nb.cells)


def teardown_module():
    if TIMINGS:
        total = sum(s for *_, s in TIMINGS)
        print(f"\n[gpu cells] {len(TIMINGS)} cells, {total:.1f} s in cells "
              f"(slowest {max(TIMINGS, key=lambda r: r[2])})")
