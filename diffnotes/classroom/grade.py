"""Grade a folder of submitted notebooks: one sandboxed process per exercise, a clean verdict.

For each submission and each exercise, :func:`diffnotes.classroom.sandbox.run` executes the
chapter's setup cell and the submission's exercise cell in a fresh, limited process, which only
records the function's outputs on the checker's inputs. This process then calls
:func:`diffnotes.exercises.check` on :func:`diffnotes.exercises.replay` of those outputs — the
student's own self-check, on the same cases — and gives one point per passing property.
"""
from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..exercises import available, check, replay
from . import notebook as nbk
from .assign import MANIFEST
from .sandbox import Limits, Outcome, Snapshot, run

MAX_NOTEBOOK = 50 * 2 ** 20


@dataclass
class ExerciseGrade:
    exercise: str
    points: float
    max_points: int
    status: str
    message: str
    properties: list = field(default_factory=list)   # [(name, passed, message)]
    wall_s: float = 0.0


@dataclass
class SubmissionGrade:
    submission: str
    assignment: str | None
    exercises: list = field(default_factory=list)
    note: str = ""

    @property
    def total(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_points(self) -> int:
        return sum(e.max_points for e in self.exercises)


def load_manifests(path) -> dict[str, dict]:
    """Every assignment under ``path`` (a folder made by ``assign``, or one assignment in it)."""
    path = Path(path)
    found = sorted(path.glob(f"**/autograder/{MANIFEST}")) or sorted(path.glob(f"**/{MANIFEST}"))
    out = {}
    for m in found:
        d = json.loads(m.read_text())
        d["_dir"] = str(m.parent)
        out[d["assignment"]] = d
    if not out:
        raise FileNotFoundError(f"no {MANIFEST} under {path}: run `assign` first")
    return out


def _load_submission(path: Path):
    try:
        if path.stat().st_size > MAX_NOTEBOOK:
            return None, "notebook larger than 50 MiB"
        nb = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
            return None, "not a notebook"
        return nb, ""
    except (OSError, ValueError) as e:
        return None, f"unreadable notebook ({type(e).__name__})"


def _which_assignment(nb: dict, path: Path, manifests: dict) -> str | None:
    name = (nb.get("metadata", {}).get("otter", {}) or {}).get("assignment_name")
    if name in manifests:
        return name
    for a in manifests:
        if a in path.stem:
            return a
    return next(iter(manifests)) if len(manifests) == 1 else None


def exercise_cells(nb: dict, manifest: dict) -> dict[str, tuple[int, str]]:
    """``{exercise name: (cell index, source)}`` found in a submission (metadata first, then the
    ``check("<checker>", <function>)`` line)."""
    cells = [c for c in nb["cells"] if isinstance(c, dict) and c.get("cell_type") == "code"]
    found = {}
    for ex in manifest["exercises"]:
        for i, c in enumerate(cells):
            meta = c.get("metadata", {}) if isinstance(c.get("metadata"), dict) else {}
            if (meta.get("diffnotes") or {}).get("exercise") == ex["name"]:
                found[ex["name"]] = (i, nbk.source(c))
                break
        else:
            for i, c in enumerate(cells):
                if nbk.last_check_call(nbk.source(c)) == (ex["checker"], ex["function"]):
                    found[ex["name"]] = (i, nbk.source(c))
                    break
    return found


def _score(ex: dict, manifest: dict, outcome: Outcome) -> ExerciseGrade:
    why = outcome.note or "the process exited (status 0) before recording this case"
    if outcome.status != "ok":
        why = f"{outcome.status}" + (f"; {outcome.note}" if outcome.note else "")
    res = check(ex["checker"], replay(outcome.rows, missing=why), cases=manifest["cases"],
                seed=manifest["seed"], verbose=False)
    props = [(p.name, p.passed, p.message) for p in res.properties]
    pts = sum(p.passed for p in res.properties)
    return ExerciseGrade(ex["name"], pts, len(props), outcome.status, res.message, props,
                         outcome.wall_s)


def _missing(ex: dict, manifest: dict, why: str) -> ExerciseGrade:
    n = len(ex["properties"])
    return ExerciseGrade(ex["name"], 0, n, "not graded", why,
                         [(p, False, why) for p in ex["properties"]])


def grade(assignments, submissions, out_csv=None, limits: Limits | None = None,
          jobs: int | None = None, engine: str = "direct") -> list[SubmissionGrade]:
    """Grade every ``*.ipynb`` under ``submissions`` against the assignments under
    ``assignments``; write ``out_csv`` (points per exercise) and ``<out_csv stem>_properties.csv``
    (one row per property). ``engine="otter"`` executes each exercise with ``otter run``."""
    limits = limits or Limits()
    manifests = load_manifests(assignments)
    available()                                   # import every checker before any submission
    snapshot = Snapshot()
    subs = sorted(p for p in Path(submissions).rglob("*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)
    results, tasks = [], []
    for p in subs:
        sg = SubmissionGrade(str(p.relative_to(submissions).with_suffix("")), None)
        results.append(sg)
        nb, err = _load_submission(p)
        if nb is None:
            sg.note = err
            continue
        a = _which_assignment(nb, p, manifests)
        if a is None:
            sg.note = "no assignment matches this notebook"
            continue
        sg.assignment, man = a, manifests[a]
        cells = exercise_cells(nb, man)
        order = sorted(cells.values())
        for k, ex in enumerate(man["exercises"]):
            if ex["name"] not in cells:
                sg.exercises.append(_missing(ex, man, "exercise cell not found"))
                continue
            idx, src = cells[ex["name"]]
            borrow = "".join(nbk.plain_definitions(s) for i, s in order if i < idx)
            setup = nbk.setup_slice(man["setup"], borrow, src)
            spec = {"engine": engine, "setup": setup,
                    "borrow": borrow, "cell": nbk.python_source(src), "question": ex["name"],
                    "checker": ex["checker"], "function": ex["function"],
                    "checker_module": ex.get("checker_module") or "diffnotes.exercises",
                    "cases": man["cases"], "seed": man["seed"]}
            red = zipp = None
            if engine == "otter":
                red = _reduced_notebook(man, setup, borrow, src)
                zipp = Path(man["_dir"]) / man["otter_autograder"]
            sg.exercises.append(None)
            tasks.append((sg, len(sg.exercises) - 1, ex, man, spec, red, zipp))

    def work(t):
        sg, slot, ex, man, spec, red, zipp = t
        try:
            outcome = run(spec, snapshot, limits, notebook=red, autograder_zip=zipp)
        except Exception as e:                      # the grader's own failure, not the student's
            outcome = Outcome([], "error", f"grader error: {type(e).__name__}: {e}")
        sg.exercises[slot] = _score(ex, man, outcome)

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        list(pool.map(work, tasks))
    if out_csv:
        write_csv(results, manifests, out_csv)
    return results


def _reduced_notebook(man, setup, borrow, src) -> dict:
    cell = lambda s, meta=None: {"cell_type": "code", "execution_count": None,  # noqa: E731
                                 "metadata": meta or {}, "outputs": [], "source": s}
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"otter": {"assignment_name": man["assignment"]},
                         "kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}},
            "cells": [cell(setup), cell(borrow), cell(src)]}


def _columns(manifests) -> list[tuple[str, str, str]]:
    names = [e["name"] for m in manifests.values() for e in m["exercises"]]
    plain = len(names) == len(set(names))
    return [(a, e["name"], e["name"] if plain else f"{a}.{e['name']}")
            for a, m in manifests.items() for e in m["exercises"]]


def _short(msg: str, n: int = 100) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def write_csv(results: list[SubmissionGrade], manifests: dict, out_csv) -> None:
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(manifests)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["submission", "assignment"] + [c[2] for c in cols] + ["total", "max", "failing"])
        for sg in results:
            by = {e.exercise: e for e in sg.exercises}
            row = [sg.submission, sg.assignment or ""]
            for a, e, _ in cols:
                row.append(f"{by[e].points:g}/{by[e].max_points}" if a == sg.assignment and e in by
                           else "")
            failing = [f"{e.exercise} ({e.status if e.status != 'ok' else _short(e.message)})"
                       for e in sg.exercises if e.points < e.max_points]
            row += [f"{sg.total:g}", sg.max_points, "; ".join(failing) or sg.note]
            w.writerow(row)
    with open(out_csv.with_name(out_csv.stem + "_properties.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["submission", "assignment", "exercise", "property", "passed", "status",
                    "message"])
        for sg in results:
            for e in sg.exercises:
                for name, ok, msg in e.properties:
                    w.writerow([sg.submission, sg.assignment, e.exercise, name, int(ok), e.status,
                                " ".join(msg.split())])


def table(results: list[SubmissionGrade]) -> str:
    """The grades as a plain-text table (what ``grade`` prints)."""
    names = []
    for sg in results:
        names += [e.exercise for e in sg.exercises if e.exercise not in names]
    head = ["submission"] + names + ["total"]
    rows = []
    for sg in results:
        by = {e.exercise: e for e in sg.exercises}
        rows.append([sg.submission] + [f"{by[n].points:g}/{by[n].max_points}" if n in by else "-"
                                       for n in names] + [f"{sg.total:g}/{sg.max_points}"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
