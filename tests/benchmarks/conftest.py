"""Benchmarks record their figures for the book's benchmarks page.

``record(name, value, goal=..., unit=..., note=...)`` appends one row to
``_build/benchmarks.json`` (or ``$DIFFNOTES_BENCH_OUT``); the file is started afresh by each
``make bench`` session, and the book build's ``{benchmarks}`` directive renders it.
"""
import datetime
import json
import os
import pathlib
import platform

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = pathlib.Path(os.environ.get("DIFFNOTES_BENCH_OUT", ROOT / "_build" / "benchmarks.json"))
_ROWS = []


@pytest.fixture(scope="session")
def record():
    def _record(name, value, goal=None, unit="ratio", note=""):
        _ROWS.append({"name": name, "value": float(value), "goal": goal, "unit": unit,
                      "note": note})
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "rows": _ROWS}, indent=1))
    return _record
