"""What the chapters and the book build share: the repository, the Colab install cell, and glue.

* The repository URL and branch are named once, under ``repository:`` in ``_config.yml``
  (Jupyter Book's launch buttons read them there). :func:`repository` reads them.
* A notebook opened on Colab knows nothing but its own text, so its first code cell must name
  where to install from. That cell is *written* from ``_config.yml`` by :func:`sync_install_cells`
  (run by the book build and by ``python -m diffnotes.book sync``), never edited by hand; it is
  tagged ``remove-cell`` so the website starts each page with its title.
  ``tests/test_book_structure.py`` fails when a notebook's install cell is out of date.
* :func:`glue` publishes a chapter's measured figure for ``book/results.md`` (MyST-NB's
  ``glue``; a no-op where MyST-NB is not installed, e.g. on Colab).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

__all__ = ["ROOT", "repository", "install_cell_source", "sync_install_cells", "glue",
           "INSTALL_TAG"]

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


if __name__ == "__main__":
    if sys.argv[1:] != ["sync"]:
        sys.exit("usage: python -m diffnotes.book sync")
    for p in sync_install_cells():
        print("rewrote the install cell of", p.relative_to(ROOT))
