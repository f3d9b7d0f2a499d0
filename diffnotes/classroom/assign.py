"""Chapter -> otter-grader master notebook -> ``otter assign`` -> student notebook + autograder."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

from ..exercises import available, property_names
from . import notebook as nbk

MANIFEST = "diffnotes-classroom.json"
CASES, SEED = 5, 0          # the self-check's defaults: the grade and check() see the same cases


def _id() -> str:
    import uuid
    return uuid.uuid4().hex[:8]


def _raw(text: str) -> dict:
    return {"cell_type": "raw", "id": _id(), "metadata": {}, "source": text}


def _code(text: str, metadata: dict | None = None) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": _id(),
            "metadata": metadata or {}, "outputs": [], "source": text}


def _prompt_block(placeholder: str) -> str:
    """The placeholder as an otter PROMPT block: the student notebook keeps its lines, the
    autograder's solution notebook sees them inside a string literal that never runs."""
    q = '"""' if '"""' not in placeholder else "'''"
    if q in placeholder:
        raise ValueError("an exercise placeholder may not contain both \"\"\" and '''")
    return f"{q} # BEGIN PROMPT\n{placeholder.rstrip()}\n{q}; # END PROMPT\n"


def _test_cell(ex: nbk.Exercise, prop: str) -> dict:
    return _code(
        f'""" # BEGIN TEST CONFIG\npoints: 1\nhidden: false\n'
        f'success_message: "{ex.name}: {prop}"\n""" # END TEST CONFIG\n'
        f"from diffnotes.classroom.otter_tests import require\n"
        f'require("{ex.name}", "{ex.checker}", {ex.function}, "{prop}", '
        f"cases={CASES}, seed={SEED})\n")


def master_notebook(ch: nbk.Chapter, name: str) -> dict:
    """The chapter in otter's master-notebook format (v1): one question per checked exercise,
    its solution cell (solution + placeholder as prompt + the self-check line) and one test case
    per checker property; every solution dropdown is stripped from the markdown."""
    by_cell = {e.cell_index: e for e in ch.exercises}
    config = {
        "name": name, "init_cell": False, "check_all_cell": False, "export_cell": False,
        "run_tests": False, "solutions_pdf": False, "template_pdf": False,
        "tests": {"files": True}, "requirements": "requirements.txt",
        "overwrite_requirements": False,
    }
    import yaml
    cells = [_raw("# ASSIGNMENT CONFIG\n" + yaml.safe_dump(config, sort_keys=False))]
    for i, cell in enumerate(ch.nb["cells"]):
        ex = by_cell.get(i)
        if ex is not None:
            lines = ex.placeholder.rstrip().splitlines()
            check_line = lines[-1] if nbk.CHECK_CALL.match(lines[-1]) else ""
            prompt = "\n".join(lines[:-1] if check_line else lines)
            meta = dict(cell.get("metadata", {}))
            meta["diffnotes"] = {"exercise": ex.name, "checker": ex.checker,
                                 "function": ex.function}
            src = (f"# BEGIN SOLUTION NO PROMPT\n{ex.solution.rstrip()}\n# END SOLUTION\n"
                   + _prompt_block(prompt) + "\n" + (check_line or
                                                    f'check("{ex.checker}", {ex.function});'))
            sol_cell = {**_code(src, meta), "id": cell.get("id") or _id()}
            cells += [_raw(f"# BEGIN QUESTION\nname: {ex.name}\n"),
                      _raw("# BEGIN SOLUTION"), sol_cell, _raw("# END SOLUTION"),
                      _raw("# BEGIN TESTS"),
                      *[_test_cell(ex, p) for p in property_names(CASES)],
                      _raw("# END TESTS"), _raw("# END QUESTION")]
        elif cell.get("cell_type") == "markdown":
            text = nbk.strip_solutions(nbk.source(cell))
            if text.strip():
                cells.append({**cell, "source": text})
        else:
            c = dict(cell)
            if c.get("cell_type") == "code":
                c["outputs"], c["execution_count"] = [], None
            cells.append(c)
    return {**ch.nb, "cells": cells}


def _requirements() -> str:
    try:
        from ..book import repository
        url, branch = repository()
        return f"diffnotes[classroom] @ git+{url}@{branch}\n"
    except Exception:
        return "diffnotes[classroom]\n"


def assign_chapter(path, out, quiet: bool = True) -> dict:
    """Make ``out/<chapter>/student/<chapter>.ipynb`` and ``out/<chapter>/autograder/`` (otter's
    autograder zip, solution notebook, tests, and this package's manifest). Returns the manifest."""
    import otter.assign

    ch = nbk.parse_chapter(path)
    if not ch.exercises:
        raise ValueError(f"{path} has no exercise with a checker")
    unknown = [e.checker for e in ch.exercises if e.checker not in available()]
    missing = [f"exercise {e.number} ({e.checker})" for e in ch.exercises if e.solution is None]
    if unknown:
        raise ValueError(f"{path}: unknown checker(s) {unknown}; known: {available()}")
    if missing:
        raise ValueError(f"{path}: no ```python block in the solution dropdown of "
                         f"{', '.join(missing)} (CONVENTIONS: the dropdown's first block is a "
                         f"complete replacement of the exercise cell's definitions)")
    name = ch.stem
    dest = Path(out) / name
    if dest.exists():
        shutil.rmtree(dest)
    work = dest / "_master"
    work.mkdir(parents=True)
    (work / "requirements.txt").write_text(_requirements())
    master = work / f"{name}.ipynb"
    nbk.write(master_notebook(ch, name), master)
    log = io.StringIO()
    with contextlib.redirect_stdout(log) if quiet else contextlib.nullcontext():
        otter.assign.main(str(master), str(dest), no_pdfs=True, no_run_tests=True)
    zips = sorted((dest / "autograder").glob(f"{name}-autograder_*.zip"))
    from ..exercises import _REGISTRY
    manifest = {
        "assignment": name, "chapter": str(path), "cases": CASES, "seed": SEED,
        "setup": nbk.source(ch.nb["cells"][ch.setup_index]),
        "otter_autograder": zips[-1].name if zips else None,
        "exercises": [{"name": e.name, "checker": e.checker, "function": e.function,
                       "checker_module": _REGISTRY[e.checker].module, "number": e.number, "points": len(property_names(CASES)),
                       "properties": property_names(CASES), "solution": e.solution}
                      for e in ch.exercises],
    }
    (dest / "autograder" / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(work)
    return manifest


def assign(chapters, out, quiet: bool = True) -> list[dict]:
    return [assign_chapter(p, out, quiet=quiet) for p in chapters]
