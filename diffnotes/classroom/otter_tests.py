"""What the otter test cases of an assignment call (in the notebook's kernel, under otter).

Each question has one otter test case per checker property (one point each): ``require`` runs
:func:`diffnotes.exercises.check` once per function and asserts the property. This is the grading
``otter run`` / ``otter grade`` (Docker) / Gradescope perform with the autograder zip: it trusts
the kernel. ``python -m diffnotes.classroom grade`` does not: see :mod:`diffnotes.classroom.grade`.
Under that grader (``DIFFNOTES_CLASSROOM_RECORD`` set), ``require`` also records the function's
outputs as data for the clean process.
"""
from __future__ import annotations

import os

from ..exercises import check, record

_CACHE: dict = {}


def require(question: str, checker: str, fn, prop: str, cases: int = 5, seed: int = 0) -> None:
    key = (question, id(fn))
    if key not in _CACHE:
        rec = os.environ.get("DIFFNOTES_CLASSROOM_RECORD")
        if rec:
            with open(os.path.join(rec, f"{question}.jsonl"), "w") as sink:
                record(checker, fn, cases=cases, seed=seed, sink=sink)
        _CACHE[key] = check(checker, fn, cases=cases, seed=seed, verbose=False)
    res = _CACHE[key]
    for p in res.properties:
        if p.name == prop:
            assert p.passed, f"{question}: {prop} fails: {p.message or res.message}"
            return
    raise AssertionError(f"{question}: unknown property {prop!r}")
