"""Assign chapters' exercises and grade submissions, built on otter-grader (``diffnotes[classroom]``).

``python -m diffnotes.classroom assign CHAPTER.ipynb... --out dist/`` writes, per chapter, an
otter master notebook and runs ``otter assign`` on it: ``dist/<chapter>/student/<chapter>.ipynb``
(solutions removed, placeholders and self-checks kept) and ``dist/<chapter>/autograder/`` (otter's
autograder zip, the solution notebook, one otter test case per checker property).

``python -m diffnotes.classroom grade dist/ SUBMISSIONS/ --csv grades.csv`` grades every notebook
under ``SUBMISSIONS/``: each exercise of each submission runs in its own process (fresh temporary
directory, wall-time, memory and file-size limits, root dropped to ``nobody``), which only records
the function's outputs; this process calls :func:`diffnotes.exercises.check` on them. One point
per checker property. See ``book/instructors.md``.
"""
from __future__ import annotations

__all__ = ["assign", "grade", "fill", "table", "Limits"]


def assign(chapters, out, quiet=True):
    from .assign import assign as _assign
    return _assign(chapters, out, quiet=quiet)


def grade(assignments, submissions, out_csv=None, limits=None, jobs=None, engine="direct"):
    from .grade import grade as _grade
    return _grade(assignments, submissions, out_csv, limits=limits, jobs=jobs, engine=engine)


def table(results):
    from .grade import table as _table
    return _table(results)


def fill(student_notebook, answers: dict, out) -> None:
    """Write a copy of ``student_notebook`` whose exercise cells are replaced: ``answers`` maps an
    exercise name to the cell's new source (its function definitions; the self-check line of the
    placeholder is kept at the end). Used to make reference or test submissions."""
    from . import notebook as nbk
    nb = nbk.read(student_notebook)
    for cell in nb["cells"]:
        ex = (cell.get("metadata", {}).get("diffnotes") or {}).get("exercise")
        if ex in answers:
            src = nbk.source(cell).rstrip().splitlines()
            tail = src[-1] if src and nbk.CHECK_CALL.match(src[-1]) else ""
            cell["source"] = answers[ex].rstrip() + ("\n\n" + tail if tail else "") + "\n"
    nbk.write(nb, out)


def Limits(**kw):  # noqa: N802  (a dataclass, imported lazily)
    from .sandbox import Limits as _L
    return _L(**kw)
