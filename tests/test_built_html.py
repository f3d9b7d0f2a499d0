"""No progress bar and no library warning leaks into the built pages' cell outputs.

Scans the text of every cell output (MyST-NB's ``cell_output`` blocks; scripts and styles
excluded, prose not scanned) of every page in ``_build/html`` (or ``$DIFFNOTES_SITE``) for tqdm's
``it/s]`` / ``s/it]``, for ``Warning`` / ``warn(`` (a Python warning's category or the call that
raised it), and for the transformers "requires torchvision ... falling back" notice.

The build drops stderr from the pages (``stderr_output: remove``), which would also hide a
library warning that every Jupyter or Colab reader of the chapter still sees. So the notebooks as
the build executed them (``_build/jupyter_execute``, every stream kept) are scanned for warnings
too; progress bars there are fine. Both tests skip when the book has not been built.
"""
from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("DIFFNOTES_SITE", ROOT / "_build" / "html"))
LEAKS = [("tqdm progress bar", re.compile(r"it/s\]|s/it\]")),
         ("warning", re.compile(r"Warning|warn\(")),
         ("transformers torchvision notice", re.compile(r"requires torchvision"))]


class _Outputs(HTMLParser):
    """Collects the text inside ``<div class="... cell_output ...">``, per output block."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._depth = 0          # div depth inside the current cell_output (0: outside)
        self._skip = 0           # inside <script>/<style>

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        if tag != "div":
            return
        cls = (dict(attrs).get("class") or "").split()
        if self._depth:
            self._depth += 1
        elif "cell_output" in cls:
            self._depth = 1
            self.blocks.append("")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(self._skip - 1, 0)
        elif tag == "div" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._depth and not self._skip:
            self.blocks[-1] += data


def _pages():
    return sorted(p for p in SITE.rglob("*.html")
                  if not {"_static", "_sources"} & set(p.relative_to(SITE).parts))


def test_no_progress_bar_or_warning_in_outputs():
    if not (SITE / "index.html").is_file():
        pytest.skip(f"no built site at {SITE} (run `make book` first)")
    leaks, n_outputs = [], 0
    for page in _pages():
        parser = _Outputs()
        parser.feed(page.read_text(errors="replace"))
        n_outputs += len(parser.blocks)
        for block in parser.blocks:
            for what, rx in LEAKS:
                for m in rx.finditer(block):
                    line = block[block.rfind("\n", 0, m.start()) + 1:].split("\n", 1)[0]
                    leaks.append(f"{page.relative_to(SITE)}: {what}: {line.strip()[:160]}")
    assert n_outputs > 0 or not any("chapters" in str(p) for p in _pages()), \
        "no cell outputs found at all: was the book built with execution off?"
    assert not leaks, "outputs that leak progress bars or warnings:\n" + "\n".join(leaks[:40])


def test_no_library_warning_in_executed_chapters():
    executed = SITE.parent / "jupyter_execute"
    notebooks = sorted(executed.rglob("*.ipynb")) if executed.is_dir() else []
    if not notebooks:
        pytest.skip(f"no executed notebooks under {executed} (run `make book` first)")
    leaks = []
    for path in notebooks:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb.get("cells", [])):
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", "")) if out.get("output_type") == "stream" else ""
                for what, rx in LEAKS[1:]:             # warnings and the torchvision notice
                    for m in rx.finditer(text):
                        line = text[text.rfind("\n", 0, m.start()) + 1:].split("\n", 1)[0]
                        leaks.append(f"{path.relative_to(executed)} cell {i} "
                                     f"(id {cell.get('id', '?')}, {out.get('name')}): {what}: "
                                     f"{line.strip()[:160]}")
    assert not leaks, ("library warnings printed by the chapters (hidden on the website, seen by "
                       "every Jupyter/Colab reader):\n" + "\n".join(leaks[:40]))
