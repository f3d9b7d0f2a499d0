"""Reading a chapter's exercises (the shape CONVENTIONS fix) and editing notebooks as JSON.

An exercise with a checker is a code cell tagged ``exercise`` (or, for chapters not yet tagged,
any code cell calling ``check("<checker>", <function>)``) that ends with the self-check line,
followed by a markdown cell opening with ``:::{dropdown} Solution`` whose first ```` ```python ````
block replaces the cell's definitions. The chapter's *setup cell* is its first code cell that
imports ``diffnotes.exercises`` (else its first code cell after the Colab install cell).
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

CHECK_CALL = re.compile(r"""^\s*check\(\s*["']([A-Za-z0-9_]+)["']\s*,\s*([A-Za-z_][A-Za-z0-9_]*)""",
                        re.M)
DROPDOWN_OPEN = re.compile(r"^(:{3,})\{dropdown\}\s*Solution\b.*$")
PY_FENCE = re.compile(r"^(`{3,})python\s*$")


@dataclass
class Exercise:
    """One exercise with a checker, as read from a chapter."""

    name: str               # the question's name (the checker's, made unique within the chapter)
    checker: str            # the name passed to diffnotes.exercises.check
    function: str           # the student's function that check() receives
    cell_index: int         # position of the exercise cell in the chapter
    placeholder: str        # the exercise cell's source (placeholder definitions + check line)
    solution: str | None    # the dropdown's first ```python block, or None if it has none
    number: int = 0         # 1, 2, ... in chapter order


@dataclass
class Chapter:
    path: Path
    nb: dict
    setup_index: int
    exercises: list[Exercise] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return self.path.stem


def source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else str(s)


def tags(cell: dict) -> list:
    t = cell.get("metadata", {}).get("tags", [])
    return t if isinstance(t, list) else []


def read(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write(nb: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def last_check_call(src: str):
    """``(checker, function)`` of the cell's last ``check("...", f)`` line, or None."""
    m = list(CHECK_CALL.finditer(src))
    return (m[-1].group(1), m[-1].group(2)) if m else None


def is_exercise_cell(cell: dict) -> bool:
    return cell.get("cell_type") == "code" and (
        "exercise" in tags(cell) or last_check_call(source(cell)) is not None)


def solution_code(markdown: str) -> str | None:
    """The first ```python block inside a ``:::{dropdown} Solution`` of ``markdown``."""
    lines = markdown.splitlines()
    inside, fence, code = None, None, []
    for line in lines:
        if inside is None:
            m = DROPDOWN_OPEN.match(line.strip())
            if m:
                inside = m.group(1)
            continue
        if fence is None:
            if line.strip() == inside:
                return None
            m = PY_FENCE.match(line.strip())
            if m:
                fence = m.group(1)
            continue
        if line.strip() == fence:
            return "\n".join(code).rstrip() + "\n"
        code.append(line)
    return None


def strip_solutions(markdown: str) -> str:
    """``markdown`` without its ``:::{dropdown} Solution`` blocks (the text around them stays)."""
    out, closing, fence = [], None, None
    for line in markdown.splitlines(keepends=True):
        if closing is None:
            m = DROPDOWN_OPEN.match(line.strip())
            if m:
                closing = m.group(1)
                continue
            out.append(line)
        else:
            st = line.strip()
            if fence is not None:                       # inside a code block of the dropdown
                fence = None if st == fence else fence
            elif re.match(r"^`{3,}", st):
                fence = re.match(r"^`{3,}", st).group(0)
            elif st == closing:
                closing = None
    return re.sub(r"\n{3,}", "\n\n", "".join(out)).strip("\n")


def setup_index(cells: list) -> int:
    code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code"]
    for i in code:
        s = source(cells[i])
        if "remove-cell" not in tags(cells[i]) and re.search(r"from\s+diffnotes\.exercises\s+import", s):
            return i
    for i in code:
        if "remove-cell" not in tags(cells[i]) and not is_exercise_cell(cells[i]):
            return i
    raise ValueError("the notebook has no setup code cell")


def parse_chapter(path) -> Chapter:
    """The chapter's setup cell and its exercises with checkers, in order."""
    path = Path(path)
    nb = read(path)
    cells = nb["cells"]
    ch = Chapter(path, nb, setup_index(cells))
    seen: dict[str, int] = {}
    for i, cell in enumerate(cells):
        if not is_exercise_cell(cell) or i == ch.setup_index:
            continue
        call = last_check_call(source(cell))
        if call is None:
            raise ValueError(f"{path}: cell {i} is tagged `exercise` but has no "
                             f"check(\"<name>\", <function>) line")
        checker, fn = call
        sol = None
        for j in range(i + 1, len(cells)):
            if is_exercise_cell(cells[j]):
                break
            if cells[j].get("cell_type") == "markdown" and DROPDOWN_OPEN.match(
                    source(cells[j]).lstrip().splitlines()[0].strip() if source(cells[j]).strip() else ""):
                sol = solution_code(source(cells[j]))
                break
        seen[checker] = seen.get(checker, 0) + 1
        name = checker if seen[checker] == 1 else f"{checker}_{seen[checker]}"
        ch.exercises.append(Exercise(name, checker, fn, i, source(cell), sol, len(ch.exercises) + 1))
    return ch


# ---------------------------------------------------------------- running cells outside Jupyter
def python_source(src: str) -> str:
    """A cell's source as plain Python: IPython magics and shell lines become no-ops."""
    out = []
    for line in src.splitlines():
        st = line.lstrip()
        out.append(line[: len(line) - len(st)] + "pass  # " + st if st[:1] in ("%", "!") else line)
    return "\n".join(out) + "\n"


def plain_definitions(src: str) -> str:
    """Only the cell's undecorated ``def``\\ s whose defaults are constants, and its imports.

    What an exercise may borrow from another exercise's cell without running any of it: no
    top-level statement of that cell executes.
    """
    try:
        tree = ast.parse(python_source(src))
    except SyntaxError:
        return ""
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            keep.append(node)
        elif isinstance(node, ast.FunctionDef) and not node.decorator_list and not node.returns:
            a = node.args
            defaults = a.defaults + [d for d in a.kw_defaults if d is not None]
            annotated = any(x.annotation is not None for x in a.args + a.kwonlyargs + a.posonlyargs)
            if all(isinstance(d, ast.Constant) for d in defaults) and not annotated:
                keep.append(node)
    return ast.unparse(ast.Module(body=keep, type_ignores=[])) + "\n" if keep else ""


def _loaded_names(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.value.id for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}


def _bound_names(node) -> set:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def setup_slice(setup: str, *users: str) -> str:
    """The statements of the setup cell that the ``users``' code needs, transitively, in order.

    An exercise cell may use only names from the setup cell and its own definitions
    (CONVENTIONS), so grading runs this slice rather than the whole cell (which may load models
    and data sets): imports, assignments and definitions that bind a needed name, and calls on
    names already kept (``torch.set_num_threads(1)``). ``from m import *`` is always kept.
    """
    try:
        tree = ast.parse(python_source(setup))
    except SyntaxError:
        return python_source(setup)
    need = set()
    for u in users:
        try:
            need |= _loaded_names(ast.parse(python_source(u)))
        except SyntaxError:
            pass
    body = tree.body
    keep = [False] * len(body)
    changed = True
    while changed:
        changed = False
        for i in range(len(body) - 1, -1, -1):
            node = body[i]
            star = isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names)
            if not keep[i] and (star or _bound_names(node) & need):
                keep[i], changed = True, True
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    need |= _loaded_names(node)
    bound = set().union(*[_bound_names(n) for n, k in zip(body, keep) if k]) if any(keep) else set()
    for i, node in enumerate(body):
        if not keep[i] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            if _loaded_names(node) and _loaded_names(node) <= bound:
                keep[i] = True
    kept = [n for n, k in zip(body, keep) if k]
    return ast.unparse(ast.Module(body=kept, type_ignores=[])) + "\n" if kept else ""
