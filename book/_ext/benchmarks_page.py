"""The ``{benchmarks}`` directive: the table of the last ``make bench`` run.

``make bench`` writes ``_build/benchmarks.json`` (tests/benchmarks/conftest.py); the book build
reads it here. Without that file the page says that no benchmark has been run on this machine.
"""
import json
import os
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]


def _table(header, rows):
    table = nodes.table()
    group = nodes.tgroup(cols=len(header))
    table += group
    for _ in header:
        group += nodes.colspec(colwidth=1)
    head = nodes.thead()
    body = nodes.tbody()
    group += head
    group += body
    for target, cells in ((head, [header]), (body, rows)):
        for cells_row in cells:
            row = nodes.row()
            for text in cells_row:
                entry = nodes.entry()
                entry += nodes.paragraph(text=str(text))
                row += entry
            target += row
    return table


class BenchmarksDirective(SphinxDirective):
    has_content = False

    def run(self):
        path = Path(os.environ.get("DIFFNOTES_BENCH_OUT", ROOT / "_build" / "benchmarks.json"))
        self.env.note_dependency(str(path))
        if not path.exists():
            return [nodes.paragraph(text="No benchmark run was found on the machine that built "
                                         "this page (run `make bench` before `make book`).")]
        data = json.loads(path.read_text())
        rows = [(r["name"], f"{r['value']:.3f}" + ("" if r["unit"] == "ratio" else f" {r['unit']}"),
                 r.get("goal") or "—") for r in data["rows"]]
        intro = nodes.paragraph(text=f"Last run: {data['when']} on {data['machine']}. Each "
                                     f"figure is a ratio of two runs in the same process.")
        return [intro, _table(("benchmark", "measured", "goal"), rows)]


def setup(app):
    app.add_directive("benchmarks", BenchmarksDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
