"""The book's promises: chapters are committed without outputs, and the table of contents and
the chapters folder agree in both directions."""
import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "chapters").glob("**/*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(toc.get("parts", toc.get("chapters", [])))
    return files


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks under chapters/"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_committed_without_outputs(nb):
    data = json.loads(nb.read_text())
    for i, cell in enumerate(data["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{nb.name}: cell {i} has outputs; strip them"
            assert cell.get("execution_count") is None, f"{nb.name}: cell {i} has an execution count"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_shape(nb):
    """One title; the Colab install cell first; exercises at the end."""
    data = json.loads(nb.read_text())
    md = "\n".join("".join(c["source"]) for c in data["cells"] if c["cell_type"] == "markdown")
    assert len(re.findall(r"^# ", md, flags=re.M)) == 1, f"{nb.name}: needs exactly one '# ' title"
    code = [("".join(c["source"])) for c in data["cells"] if c["cell_type"] == "code"]
    assert "google.colab" in code[0], f"{nb.name}: the first code cell must be the Colab install cell"
    assert re.search(r"^#+ .*Exercises", md, flags=re.M), f"{nb.name}: no Exercises section"


def test_every_notebook_is_in_the_toc_and_every_entry_exists():
    listed = {re.sub(r"\.(ipynb|md)$", "", f) for f in _toc_files()}
    for nb in NOTEBOOKS:
        stem = str(nb.relative_to(ROOT).with_suffix(""))
        assert stem in listed, f"{stem} is not in _toc.yml"
    for f in listed:
        assert any((ROOT / (f + ext)).exists() for ext in (".ipynb", ".md")), \
            f"_toc.yml lists {f}, which does not exist"


def test_launch_buttons_and_execution_are_configured():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "force"
    assert cfg["execute"]["allow_errors"] is False
    assert cfg["launch_buttons"]["colab_url"].startswith("https://colab.research.google.com")
    assert cfg["repository"]["url"] and cfg["repository"]["branch"]


def test_install_cells_are_written_from_the_config_and_hidden():
    """The Colab install cell is the first code cell, tagged remove-cell, and says exactly what
    `python -m diffnotes.book sync` writes from _config.yml's repository (one place)."""
    from diffnotes.book import sync_install_cells

    stale = sync_install_cells(ROOT, write=False)
    assert not stale, f"run `python -m diffnotes.book sync`: stale install cells in {stale}"
    url, _ = __import__("diffnotes.book", fromlist=["repository"]).repository(ROOT / "_config.yml")
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert "remove-cell" in code[0]["metadata"].get("tags", []), nb.name
        assert sum(url in "".join(c["source"]) for c in cells) == 1, \
            f"{nb.name}: the repository URL may appear only in the generated install cell"


def _exercises(nb):
    """(statements, checked exercise cells with the solution cell after each) of a chapter."""
    cells = json.loads(nb.read_text())["cells"]
    start = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                 and re.search(r"^#+ .*Exercises", "".join(c["source"]), re.M))
    tail = cells[start:]
    statements = sum(len(re.findall(r"^\*\*\d+\.\*\*", "".join(c["source"]), re.M))
                     for c in tail if c["cell_type"] == "markdown")
    checked = [(c, tail[i + 1] if i + 1 < len(tail) else None) for i, c in enumerate(tail)
               if "exercise" in c["metadata"].get("tags", [])]
    return statements, checked


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercises_have_the_classroom_shape_and_half_have_checkers(nb):
    """Each checked exercise: a code cell tagged `exercise` ending in check("name", fn), then a
    Solution dropdown whose first block is Python; at least half of the exercises are checked."""
    from diffnotes.exercises import available

    statements, checked = _exercises(nb)
    assert statements >= 1, f"{nb.name}: no numbered exercise (**1.** ...)"
    assert 2 * len(checked) >= statements, \
        f"{nb.name}: {len(checked)} of {statements} exercises have a checker; need half"
    for cell, sol in checked:
        src = "".join(cell["source"])
        m = re.search(r'check\("([^"]+)",\s*\w+\)\s*;?\s*$', src)
        assert cell["cell_type"] == "code" and m, f"{nb.name}: exercise cell must end in check(...)"
        assert m.group(1) in available(), f"{nb.name}: no checker named {m.group(1)!r}"
        text = "".join(sol["source"]) if sol else ""
        assert sol and sol["cell_type"] == "markdown" and text.lstrip().startswith(
            ":::{dropdown} Solution"), f"{nb.name}: exercise {m.group(1)} lacks a Solution dropdown"
        assert re.search(r"```python\n", text), f"{nb.name}: solution of {m.group(1)} has no code"


def test_no_control_characters_in_the_prose():
    """A TeX command written through a non-raw Python string loses its backslash to an escape
    (\\tau becomes a tab, \\vec a vertical tab): no page or markdown cell may hold one."""
    sources = [(p.name, "".join(c["source"])) for p in NOTEBOOKS
               for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "markdown"]
    sources += [(p.name, p.read_text()) for p in sorted((ROOT / "book").glob("*.md"))]
    bad = [(name, repr(ch)) for name, text in sources for ch in set(text)
           if ord(ch) < 32 and ch != "\n"]
    assert not bad, f"control characters in the prose: {bad}"


def test_cross_document_glue_references_parse():
    """myst-nb reads ``{glue:text}`path::key:spec``` by splitting off the LAST colon as the
    format spec, so ``path::key`` without a spec loses its key (the -W build fails). Every
    cross-document reference on the front-matter pages carries a spec, names a chapter that
    exists, and its key's prefix is glued in that chapter."""
    refs = [(p.name, m) for p in sorted((ROOT / "book").glob("*.md"))
            for m in re.findall(r"\{glue:text\}`([^`]*::[^`]*)`", p.read_text())]
    assert refs, "the results page has no cross-document glue references"
    for page, ref in refs:
        path, key = ref.split("::", 1)
        assert ":" in key, f"{page}: {ref!r} has no format spec (write {ref}:s)"
        nb = (ROOT / "book" / path).resolve()
        assert nb.exists(), f"{page}: {ref!r} names a missing notebook"
        text = nb.read_text()
        assert "glue(" in text and f'\\"{key.split(".")[0]}.' in text, \
            f"{page}: {ref!r}: {nb.name} glues no key of that chapter's prefix"
