"""The "Equations and code" page: every labelled equation of a chapter says which library function
computes it, that function exists, every {eq} reference has a label, and the committed page is
what the chapters generate. Each chapter also shows its core function's source with
{literalinclude} ... :pyobject:, and that object exists in that file."""
import ast
import json
import pathlib
import re

import pytest

from diffnotes import book

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "chapters").glob("**/*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)
ENTRIES = book.equation_index(ROOT)


def _markdown(path):
    if path.suffix == ".md":
        return path.read_text()
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_labels_are_unique_and_the_chapters_have_equations():
    labels = [e.label for e in ENTRIES]
    assert labels, "no labelled equation in any chapter"
    dup = {x for x in labels if labels.count(x) > 1}
    assert not dup, f"labels defined twice: {sorted(dup)}"


@pytest.mark.parametrize("e", ENTRIES, ids=lambda e: e.label)
def test_every_labelled_equation_names_its_code_and_the_code_exists(e):
    assert e.has_meta, (f"{e.chapter}: {e.label} has no '% equation: code=... | paper=... | "
                        f"source=...' line after it")
    if e.code not in ("", "-"):
        assert e.code.startswith("diffnotes."), f"{e.label}: code={e.code!r} is not a library path"
        obj = book.resolve_code(e.code)
        assert callable(obj), f"{e.label}: {e.code} is not callable"


def test_every_eq_reference_is_defined():
    defined = {e.label for e in ENTRIES}
    pages = NOTEBOOKS + sorted((ROOT / "book").glob("*.md"))
    missing = []
    for p in pages:
        for ref in re.findall(r"\{eq\}`([^`]+)`", _markdown(p)):
            if ref not in defined:
                missing.append(f"{p.relative_to(ROOT)}: {ref}")
    assert not missing, "undefined equation labels: " + ", ".join(missing)


def test_the_committed_page_is_what_the_chapters_generate():
    url, branch = book.repository(ROOT / "_config.yml")
    want = book.render_equation_index(ENTRIES, url, branch)
    have = (ROOT / book.EQUATIONS_PAGE).read_text()
    strip = lambda s: re.sub(r"#L\d+\)", ")", s)           # line anchors move with every edit
    assert strip(have) == strip(want), ("book/equations.md is stale: run "
                                        "`python -m diffnotes.book equations`")
    for e in ENTRIES:
        assert f"{{eq}}`{e.label}`" in have


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_chapter_includes_its_core_code_from_the_source(nb):
    md = _markdown(nb)
    found = re.findall(r"```\{literalinclude\}\s+(\S+)\s*\n((?::[^\n]*\n)*)", md)
    assert found, f"{nb.name}: no {{literalinclude}} of library code"
    for rel, opts in found:
        path = (nb.parent / rel).resolve()
        assert path.exists(), f"{nb.name}: {rel} does not exist"
        m = re.search(r":pyobject:\s*(\S+)", opts)
        assert m, f"{nb.name}: literalinclude of {rel} without :pyobject:"
        names = {n.name for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        assert m.group(1).split(".")[-1] in names, f"{nb.name}: {m.group(1)} is not in {rel}"
