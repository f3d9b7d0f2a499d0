"""The book's five source documents are cited as works, never as files of a working folder.

Readers do not have the text files the book was written from, so a citation must name the
document and its own section, equation, algorithm or slide title ("Ahmad's notes, eq 1.21";
"Zhu's slides, DDRM"), never the file's number or a line of it. These tests scan every text
file git tracks, or would track (``git ls-files -co --exclude-standard``), except the tests'
own fixtures (``tests/fixtures/``):

* no reference to a document by its file number (the word for a random-number seed followed by
  a space and 0, or its plural followed by 00; case-insensitive);
* no line citation of a source text: a capital L with two to four digits, or "line(s)" with two
  to four digits, shortly after a document's name or file number, or such an L-number alone in
  parentheses;
* every source document has its entry in ``book/references.bib``.

The patterns are assembled from pieces so that this file does not match itself.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: bibliography keys of the five source documents (issue 10's conventions)
SOURCE_KEYS = {
    "ahmad_notes": "Ahmad, Representation of Diffusion Models ... (lecture notes, LUMS)",
    "controlled_generation_blog": "Controlled Generation with Diffusion Models (blog post)",
    "zhou_elbo_t2ialign": "Zhou et al., ELBO-T2IAlign",
    "zhu_slides": "Zhu, Conditional Diffusion Models for IR (slides)",
    "gormley_chai_p2p": "Gormley & Chai, Prompt to Prompt (CMU 10-423/10-623, Lecture 13)",
}

_SEED = "se" + "ed"
#: the old file-number references of the source documents (see the module docstring)
FILE_REF = re.compile(_SEED + r" 0|" + _SEED + r"s 00", re.IGNORECASE)

#: names a source document may be cited by, and the bare file numbers 000-004
_DOC = (r"(?:Ahmad|Zhu|Gormley|Chai|controlled-generation blog|ELBO-T2IAlign|"
        + _SEED + r"|(?<![\w.])00[0-4]\b)")
#: a line of a text file: capital L and 2-4 digits, or "line"/"lines" and 2-4 digits (so "l2",
#: "L1 loss" and "line 4 of Algorithm 2" are not line citations)
_LINE = r"(?-i:\bL\d{2,4}\b|\blines? \d{2,4}\b)"
#: a line number within a short stretch of text after a document's name or file number, or an
#: L-number alone in parentheses (a range allowed)
LINE_REF = re.compile(_DOC + r"[^\n]{0,60}?" + _LINE
                      + r"|(?-i:\(L\d{2,4}(?:\s*[–-]\s*L?\d{2,4})?\))", re.IGNORECASE)

FIXTURES = "tests/fixtures/"


def _text_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode("utf-8", "replace")
    files = []
    for name in sorted(set(filter(None, out.split("\0")))):
        path = ROOT / name
        if name.startswith(FIXTURES) or not path.is_file():
            continue
        with open(path, "rb") as fh:
            head = fh.read(8192)
        if b"\0" in head:                       # binary (weights, images)
            continue
        files.append(name)
    return files


def _read(name: str) -> str | None:
    try:
        return (ROOT / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def _area(name: str) -> str:
    return "chapters" if name.startswith("chapters/") else "rest"


def _hits(pattern: re.Pattern, area: str) -> list[str]:
    found = []
    for name in _text_files():
        if _area(name) != area:
            continue
        text = _read(name)
        if text is None:
            continue
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{name}:{line}: {m.group(0)!r}")
    return found


@pytest.mark.parametrize("area", ["rest", "chapters"])
def test_no_source_file_numbers(area):
    """Sources are cited by name ("Ahmad's notes, eq 1.21"), not as the working files 000-004."""
    hits = _hits(FILE_REF, area)
    assert not hits, "cite the document by name, not its file number:\n" + "\n".join(hits)


@pytest.mark.parametrize("area", ["rest", "chapters"])
def test_no_line_numbers_of_source_texts(area):
    """No "L150" / "lines 395-405" of a source's text file: cite its section, equation or slide."""
    hits = _hits(LINE_REF, area)
    assert not hits, ("line numbers of the source text files mean nothing to readers; cite the "
                      "section, equation, algorithm or slide title:\n" + "\n".join(hits))


def test_patterns_catch_what_they_should():
    """The patterns above flag the old citation style and leave ordinary text alone."""
    L = "L"
    bad = [_SEED + " 000 §1.2", _SEED.capitalize() + " 003", _SEED + "s 003, 004",
           "Ahmad's notes, §1.2 (" + L + "150)", "003 " + L + "55–71", "Zhu's slides, " + L + "129",
           "Ahmad's notes, §1.5, line" + "s 395-405", "(" + L + "127–129)"]
    good = ["Ahmad's notes, eq 1.21", "Zhu's slides, *DDRM*", "torch.manual_" + _SEED + "(0)",
            "random " + _SEED + " = 0", "an L2 penalty", "L_simple", "Gormley & Chai's lecture, "
            "slide 'Cross Attention'", "line 4 of Algorithm 2"]
    for s in bad:
        assert FILE_REF.search(s) or LINE_REF.search(s), s
    for s in good:
        assert not FILE_REF.search(s) and not LINE_REF.search(s), s


def test_source_documents_are_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text(encoding="utf-8")
    keys = set(re.findall(r"@\w+\s*\{\s*([^,\s]+)\s*,", bib))
    missing = {k: v for k, v in SOURCE_KEYS.items() if k not in keys}
    assert not missing, f"book/references.bib lacks the source documents {missing}"


def test_intro_and_errata_cite_the_source_documents():
    """The intro says which documents the book is built from; the errata page cites each one it
    corrects. Both with {cite}, so the references page lists them."""
    intro = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    for key in SOURCE_KEYS:
        assert re.search(r"\{cite(?::\w+)?\}`[^`]*\b" + key + r"\b", intro), key
    errata = (ROOT / "book" / "errata.md").read_text(encoding="utf-8")
    for key in ("ahmad_notes", "controlled_generation_blog", "zhu_slides", "gormley_chai_p2p"):
        assert re.search(r"\{cite(?::\w+)?\}`[^`]*\b" + key + r"\b", errata), key
