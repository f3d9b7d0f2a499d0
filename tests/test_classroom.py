"""The classroom loop on the DDIM chapter: assign with otter, grade in sandboxes, the CSV.

One grading run covers the reference solutions (full marks), one wrong solution (that exercise
named, the others full marks) and three malicious submissions, each exercise of which attacks the
grader differently (a loop that never ends, a segfault through ctypes, ``os._exit``, overwriting
the checkers, monkeypatching ``check``, exhausting memory) next to honest exercises that must
still get their marks. Skipped without the classroom extra (``pip install diffnotes[classroom]``).
"""
import csv
import hashlib
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("otter", reason="the classroom extra is not installed")

from diffnotes.classroom import assign, fill, grade, table  # noqa: E402
from diffnotes.classroom import notebook as nbk  # noqa: E402
from diffnotes.classroom.sandbox import Limits  # noqa: E402
from diffnotes.exercises import check  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "chapters" / "01_foundations" / "ddim.ipynb"
EXERCISES = ["ddim_sigma", "ddim_step", "ode_coords"]
FULL = 9                                   # 4 properties + 5 cases, one point each

HANG = '''def my_sigma(alpha_bar_t, alpha_bar_prev, eta):
    while True:
        pass
'''
SEGFAULT = '''import ctypes
ctypes.string_at(0)
def my_ode_coords(x_t, alpha_bar):
    return x_t, alpha_bar
'''
TAMPER = '''import pathlib, diffnotes.exercises, diffnotes.classroom
for pkg in (diffnotes.exercises, diffnotes.classroom):
    for p in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        p.write_text("def check(*a, **k):\\n    return True\\n")
for p in pathlib.Path("..").glob("**/*"):
    if p.is_file():
        p.write_text('{"case": 0, "passed": true}\\n')
def my_sigma(alpha_bar_t, alpha_bar_prev, eta):
    return "PASS"
'''
EXIT = '''import os
os._exit(0)
'''
PATCH = '''import torch
import diffnotes.exercises as E
E.check = lambda *a, **k: print("PASS") or True
E._compare = lambda *a, **k: None
E._REGISTRY["ddim_step"].reference = lambda **kw: torch.zeros_like(kw["x_t"])
def my_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise):
    return torch.zeros_like(x_t)
'''
OOM = '''hog = []
while True:
    hog.append(bytearray(2 ** 26))
def my_ode_coords(x_t, alpha_bar):
    return x_t, alpha_bar
'''


def _honest(checker, src, fn):
    ns = {}
    exec(src, ns)
    return round(check(checker, ns[fn], verbose=False).score * FULL)


def _digest():
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("exercises", "classroom") for p in (ROOT / "diffnotes" / d).glob("*.py")}


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classroom")
    t0 = time.perf_counter()
    (man,) = assign([CHAPTER], tmp / "dist")
    t_assign = time.perf_counter() - t0
    student = tmp / "dist" / "ddim" / "student" / "ddim.ipynb"
    sol = {e["name"]: e["solution"] for e in man["exercises"]}
    placeholder = {c["metadata"]["diffnotes"]["exercise"]: nbk.source(c)
                   for c in nbk.read(student)["cells"] if "diffnotes" in c.get("metadata", {})}
    wrong_step = "\n".join(placeholder["ddim_step"].rstrip().splitlines()[:-1])
    subs = tmp / "submitted"
    good, bad = subs / "good", subs / "malicious"
    fill(student, sol, good / "reference.ipynb")
    fill(student, {**sol, "ddim_step": wrong_step}, good / "wrong_step.ipynb")
    fill(student, {**sol, "ddim_sigma": HANG, "ode_coords": SEGFAULT}, bad / "a_hang_segfault.ipynb")
    fill(student, {**sol, "ddim_sigma": TAMPER, "ddim_step": EXIT}, bad / "b_tamper_exit.ipynb")
    fill(student, {**sol, "ddim_step": PATCH, "ode_coords": OOM}, bad / "c_patch_oom.ipynb")
    before = _digest()
    t0 = time.perf_counter()
    res = grade(tmp / "dist", subs, tmp / "grades.csv",
                limits=Limits(timeout_s=25, memory_mb=3072), jobs=2)
    t_grade = time.perf_counter() - t0
    print(f"\nassign {t_assign:.1f} s, grade {t_grade:.1f} s\n" + table(res))
    return {"man": man, "student": student, "res": {r.submission: r for r in res},
            "csv": tmp / "grades.csv", "before": before, "after": _digest(), "tmp": tmp,
            "wrong_step": wrong_step, "sol": sol}


def points(loop, sub):
    return [e.points for e in loop["res"][sub].exercises]


def test_assignment_made_by_otter(loop):
    dist = loop["tmp"] / "dist" / "ddim"
    assert [e["name"] for e in loop["man"]["exercises"]] == EXERCISES
    ag = dist / "autograder"
    assert (ag / loop["man"]["otter_autograder"]).is_file()         # otter assign's zip
    for q in EXERCISES:
        assert (ag / "tests" / f"{q}.py").read_text().count("require(") == FULL
    text = loop["student"].read_text()
    nb = nbk.read(loop["student"])
    assert nb["metadata"]["otter"]["assignment_name"] == "ddim"
    assert "{dropdown} Solution" not in text and "BEGIN SOLUTION" not in text
    for s in loop["sol"].values():
        body = s.strip().splitlines()[-1].strip()                    # a solution's last line
        assert body not in text
    ex = [c for c in nb["cells"] if "exercise" in c["metadata"].get("tags", [])]
    assert [nbk.last_check_call(nbk.source(c))[0] for c in ex] == EXERCISES
    assert "your code here" in nbk.source(ex[0])                    # the placeholder stays


def test_reference_solutions_get_full_marks(loop):
    assert points(loop, "good/reference") == [FULL] * 3


def test_wrong_solution_is_named(loop):
    r = loop["res"]["good/wrong_step"]
    assert points(loop, "good/wrong_step")[0] == FULL and points(loop, "good/wrong_step")[2] == FULL
    step = r.exercises[1]
    assert step.exercise == "ddim_step" and step.points < FULL
    assert step.points == _honest("ddim_step", loop["wrong_step"], "my_ddim_step")
    assert step.message.startswith("value:")


def test_csv(loop):
    rows = {r["submission"]: r for r in csv.DictReader(open(loop["csv"]))}
    assert rows["good/reference"]["total"] == "27" and rows["good/reference"]["failing"] == ""
    w = rows["good/wrong_step"]
    assert w["ddim_sigma"] == "9/9" and w["ode_coords"] == "9/9" and w["ddim_step"] != "9/9"
    assert w["failing"].startswith("ddim_step")
    props = list(csv.DictReader(open(loop["csv"].with_name("grades_properties.csv"))))
    mine = [p for p in props if p["submission"] == "good/wrong_step" and p["exercise"] == "ddim_step"]
    assert [p["property"] for p in mine] == loop["man"]["exercises"][1]["properties"]
    assert sum(int(p["passed"]) for p in mine) == int(w["ddim_step"].split("/")[0])
    assert all(p["message"].startswith("value:") for p in mine if p["passed"] == "0")


def test_hang_and_segfault_get_zero_the_rest_is_graded(loop):
    r = loop["res"]["malicious/a_hang_segfault"]
    assert points(loop, "malicious/a_hang_segfault") == [0, FULL, 0]
    assert r.exercises[0].status.startswith("timeout")
    assert "timeout" in r.exercises[0].properties[0][2]             # "runs" says why
    assert r.exercises[2].status == "killed by SIGSEGV"


def test_overwriting_files_and_os_exit(loop):
    r = loop["res"]["malicious/b_tamper_exit"]
    sigma, step, ode = r.exercises
    assert sigma.points == _honest("ddim_sigma", TAMPER.split("def my_sigma")[0].split("for pkg")[0]
                                   + "def my_sigma" + TAMPER.split("def my_sigma")[1],
                                   "my_sigma") < FULL
    assert step.points == 0 and ode.points == FULL
    assert loop["after"] == loop["before"]                          # the real checkers untouched


def test_monkeypatching_check_and_memory(loop):
    r = loop["res"]["malicious/c_patch_oom"]
    sigma, step, ode = r.exercises
    assert sigma.points == FULL
    honest = _honest("ddim_step", "import torch\ndef my_ddim_step(x_t, eps, alpha_bar_t, "
                     "alpha_bar_prev, eta, noise):\n    return torch.zeros_like(x_t)\n",
                     "my_ddim_step")
    assert step.points == honest < FULL                             # what zeros earn, no more
    assert ode.points == 0 and "MemoryError" in ode.message


def test_otter_engine_agrees(loop, tmp_path):
    """The same grades when each exercise runs under `otter run` (kernel + otter test cases)."""
    nb = nbk.read(loop["tmp"] / "submitted" / "good" / "wrong_step.ipynb")
    nb["cells"] = [c for c in nb["cells"] if c["metadata"].get("diffnotes", {}).get(
        "exercise", "ddim_step") == "ddim_step"]            # only the wrong exercise: one kernel
    nbk.write(nb, tmp_path / "subs" / "wrong_step.ipynb")
    (res,) = grade(loop["tmp"] / "dist", tmp_path / "subs", limits=Limits(timeout_s=120),
                   engine="otter")
    direct = loop["res"]["good/wrong_step"].exercises[1]
    assert [e.status for e in res.exercises][0] == "not graded"     # its cell was removed
    step = res.exercises[1]
    assert (step.points, step.message) == (direct.points, direct.message)
