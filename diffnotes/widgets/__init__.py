"""Explorers: live ipywidgets sliders in a kernel, a self-contained static twin on the website.

The mechanism is :func:`explorer` (see ``_core.py``); the named explorers of the chapters are
built on it and re-exported here.
"""
from ._core import StaticExplorer, explorer, is_static, static_explorer, to_png_bytes

__all__ = ["explorer", "static_explorer", "is_static", "StaticExplorer", "to_png_bytes"]
