"""What the chapters and the book build share: the repository, the Colab install cell, and glue.

* The repository URL and branch are named once, under ``repository:`` in ``_config.yml``
  (Jupyter Book's launch buttons read them there). :func:`repository` reads them.
* A notebook opened on Colab knows nothing but its own text, so its first code cell must name
  where to install from. That cell is *written* from ``_config.yml`` by :func:`sync_install_cells`
  (run by the book build and by ``python -m diffnotes.book sync``), never edited by hand; it is
  tagged ``remove-cell`` so the website starts each page with its title.
  ``tests/test_book_structure.py`` fails when a notebook's install cell is out of date.
* :func:`equation_index` reads every labelled equation of the chapters with the comment line
  that follows it (``% equation: code=... | paper=... | source=...``); :func:`write_equation_index`
  turns it into ``book/equations.md`` ("Equations and code"), rebuilt by every book build.
* :func:`glue` publishes a chapter's measured figure for ``book/results.md`` (MyST-NB's
  ``glue``; a no-op where MyST-NB is not installed, e.g. on Colab).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOT", "repository", "install_cell_source", "sync_install_cells", "glue",
           "INSTALL_TAG", "Equation", "equation_index", "resolve_code", "render_equation_index",
           "write_equation_index"]

#: The repository checkout this package was imported from (``_config.yml`` lives here).
ROOT = Path(__file__).resolve().parent.parent
INSTALL_TAG = "remove-cell"
_MARK = "# Colab only (hidden on the website)"


def repository(config: str | Path | None = None) -> tuple[str, str]:
    """``(url, branch)`` from the ``repository:`` section of ``_config.yml``.

    Raises ``FileNotFoundError`` when there is no ``_config.yml`` (an installed copy without
    the book's sources) and ``ValueError`` when the section lacks ``url``.
    """
    import yaml

    path = Path(config) if config is not None else ROOT / "_config.yml"
    cfg = yaml.safe_load(path.read_text()) or {}
    repo = cfg.get("repository") or {}
    if not repo.get("url"):
        raise ValueError(f"{path} must set repository.url, got {repo!r}")
    return str(repo["url"]).rstrip("/"), str(repo.get("branch", "main"))


def install_cell_source(url: str, branch: str) -> str:
    """The Colab install cell for ``url`` at ``branch`` (the same text in every chapter)."""
    return (f"{_MARK}: install diffnotes. Elsewhere this cell does\n"
            "# nothing. Written from _config.yml by `python -m diffnotes.book sync`; do not edit.\n"
            "import subprocess, sys\n\n"
            "if \"google.colab\" in sys.modules:\n"
            "    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\",\n"
            f"                    \"diffnotes @ git+{url}@{branch}\"], check=True)")


def _is_install_cell(cell: dict) -> bool:
    src = "".join(cell.get("source", ""))
    return cell.get("cell_type") == "code" and ("google.colab" in src and "pip" in src)


def sync_install_cells(root: str | Path | None = None, write: bool = True) -> list[Path]:
    """Make the first code cell of every ``chapters/**/*.ipynb`` the install cell, tagged
    ``remove-cell``; return the notebooks that were (``write=False``: would be) changed."""
    root = Path(root) if root is not None else ROOT
    url, branch = repository(root / "_config.yml")
    want = install_cell_source(url, branch)
    changed = []
    for path in sorted(root.glob("chapters/**/*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        nb = json.loads(path.read_text())
        cells = nb["cells"]
        old = [i for i, c in enumerate(cells) if _is_install_cell(c)]
        first_code = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), None)
        cell = {"cell_type": "code", "execution_count": None, "id": "colab-install",
                "metadata": {"tags": [INSTALL_TAG]}, "outputs": [],
                "source": want.splitlines(keepends=True)}
        ok = (len(old) == 1 and old[0] == first_code
              and "".join(cells[old[0]]["source"]) == want
              and INSTALL_TAG in cells[old[0]].get("metadata", {}).get("tags", []))
        if ok:
            continue
        changed.append(path)
        if not write:
            continue
        for i in reversed(old):
            cell["id"] = cells[i].get("id", cell["id"])
            del cells[i]
        if "id" not in cells[0] and nb.get("nbformat_minor", 0) < 5:
            cell.pop("id")
        cells.insert(0, cell)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


def glue(key: str, value, display: bool = False):
    """Publish ``value`` under ``key`` for the results page (``{glue:text}`chapter::key```).

    Keys are ``<chapter>.<figure>`` (e.g. ``"ddim.sw_eta0_10"``). Returns ``value``, so a chapter
    can write ``acc = glue("sd.colour_acc", acc)``. Outside a MyST-NB build it only returns it.
    """
    if not isinstance(key, str) or not re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_.]+", key):
        raise ValueError(f"key must look like '<chapter>.<figure>' (lower case, digits, '_'), "
                         f"got {key!r}")
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return value
    _glue(key, value, display=display)
    return value


# ---------------------------------------------------------------------- equations and code
_LABEL = re.compile(r"\$\$\s*\((eq-[A-Za-z0-9_-]+)\)")
_META = re.compile(r"^%\s*equation:\s*(.*)$", re.M)
EQUATIONS_PAGE = "book/equations.md"


@dataclass(frozen=True)
class Equation:
    """One labelled equation of a chapter and what its ``% equation:`` line says of it."""

    label: str
    chapter: str            # path of the notebook, relative to the repository root, no suffix
    title: str              # the chapter's title
    code: str               # dotted path of the implementing function, or "-"
    paper: str              # the original paper's equation number, or "-"
    source: str             # the source document's own number, or "-"
    has_meta: bool


def _parse_meta(text: str) -> dict:
    out = {}
    for part in text.split("|"):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def equation_index(root: str | Path | None = None) -> list[Equation]:
    """Every ``$$ ... $$ (eq-...)`` of ``chapters/**/*.ipynb``, in book order within a chapter.

    The ``% equation:`` comment must follow the label within the same markdown cell, before the
    next display equation; an equation without one has ``has_meta=False`` (the tests reject it).
    """
    root = Path(root) if root is not None else ROOT
    toc = (root / "_toc.yml").read_text() if (root / "_toc.yml").exists() else ""
    order = {f: i for i, f in enumerate(re.findall(r"file:\s*([^\s#]+)", toc))}
    paths = [p for p in root.glob("chapters/**/*.ipynb") if ".ipynb_checkpoints" not in p.parts]
    paths.sort(key=lambda p: (order.get(str(p.relative_to(root).with_suffix("")), len(order)),
                              str(p)))
    out = []
    for path in paths:
        nb = json.loads(path.read_text())
        md = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
        title = next((m.group(1).strip() for text in md
                      for m in [re.search(r"^# (.+)$", text, re.M)] if m), path.stem)
        for text in md:
            labels = list(_LABEL.finditer(text))
            for k, m in enumerate(labels):
                end = labels[k + 1].start() if k + 1 < len(labels) else len(text)
                nxt = text.find("$$", m.end())
                end = min(end, nxt) if nxt != -1 else end
                meta = _META.search(text, m.end(), end)
                d = _parse_meta(meta.group(1)) if meta else {}
                out.append(Equation(m.group(1), str(path.relative_to(root).with_suffix("")),
                                    title, d.get("code", "-"), d.get("paper", "-"),
                                    d.get("source", "-"), meta is not None))
    return out


def resolve_code(dotted: str):
    """Import ``a.b.c.func`` (longest importable module prefix, then attributes)."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {dotted!r} can be imported")


def _source_link(dotted: str, url: str, branch: str) -> str:
    import inspect

    obj = inspect.unwrap(resolve_code(dotted))
    file = Path(inspect.getsourcefile(obj)).resolve().relative_to(ROOT)
    line = inspect.getsourcelines(obj)[1]
    short = dotted.removeprefix("diffnotes.")
    return f"[`{short}`]({url}/blob/{branch}/{file.as_posix()}#L{line})"


def render_equation_index(entries: list[Equation], url: str, branch: str) -> str:
    """The markdown of the "Equations and code" page: one table per chapter."""
    lines = ["# Equations and code", "",
             "Every labelled equation of the book: the chapter that derives it, its number in the",
             "original paper and in the source documents, and the library function that computes",
             "it (linked to its source; names are relative to the `diffnotes` package). Generated",
             "from the chapters by every build of the book",
             f"(`diffnotes.book.write_equation_index`); do not edit by hand.", ""]
    chapter = None
    for e in entries:
        if e.chapter != chapter:
            chapter = e.chapter
            lines += ["", f"## {{doc}}`{e.title} </{e.chapter}>`", "",
                      "| equation | paper | source document | library |", "|---|---|---|---|"]
        code = _source_link(e.code, url, branch) if e.code not in ("", "-") else "—"
        paper = e.paper if e.paper not in ("", "-") else "—"
        source = e.source if e.source not in ("", "-") else "—"
        lines.append(f"| {{eq}}`{e.label}` `{e.label}` | {paper} | {source} | {code} |")
    return "\n".join(lines) + "\n"


def write_equation_index(root: str | Path | None = None) -> Path:
    """(Re)write ``book/equations.md`` from the chapters; return its path."""
    root = Path(root) if root is not None else ROOT
    url, branch = repository(root / "_config.yml")
    page = root / EQUATIONS_PAGE
    text = render_equation_index(equation_index(root), url, branch)
    if not page.exists() or page.read_text() != text:
        page.write_text(text)
    return page


if __name__ == "__main__":
    commands = {"sync": sync_install_cells, "equations": write_equation_index}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m diffnotes.book sync | equations")
    result = commands[sys.argv[1]]()
    for p in (result if isinstance(result, list) else [result]):
        print("wrote", Path(p).relative_to(ROOT))
