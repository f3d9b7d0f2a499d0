"""One mechanism behind every explorer in the book: live sliders, and their static twin.

``explorer(render, params)`` takes a function ``render(**values) -> image`` and a dict of
parameter name → list of values. In a Jupyter or Colab kernel it shows ipywidgets sliders that
call ``render`` on demand. When the book is built (the build sets ``DIFFNOTES_STATIC=1``, see
``book/_ext/diffnotes_build.py``), or when asked with ``live=False``, it precomputes every
combination and returns a self-contained HTML page fragment: the frames as base64 PNGs and a few
lines of inline JavaScript driving ``<input type="range">`` sliders. No kernel, nothing from a
CDN.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import os
from typing import Callable, Mapping, Sequence

from tqdm.auto import tqdm

__all__ = ["explorer", "static_explorer", "is_static", "StaticExplorer", "to_png_bytes"]


def is_static() -> bool:
    """True while the book is being built, or outside an IPython kernel."""
    if os.environ.get("DIFFNOTES_STATIC") == "1":
        return True
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return True
    ip = get_ipython()
    return ip is None or not hasattr(ip, "kernel")


def to_png_bytes(image, dpi: int = 80) -> bytes:
    """PNG bytes of a PIL image, a matplotlib figure (closed afterwards) or an HWC array in [0, 1]."""
    buf = io.BytesIO()
    if hasattr(image, "savefig"):
        import matplotlib.pyplot as plt

        image.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(image)
    else:
        from PIL import Image

        if not isinstance(image, Image.Image):
            from ..utils import to_pil

            image = to_pil(image)
        image.save(buf, format="png")
    return buf.getvalue()


def _check_params(params: Mapping[str, Sequence]) -> dict[str, list]:
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty dict of name -> list of values")
    out = {}
    for k, v in params.items():
        v = list(v)
        if not v:
            raise ValueError(f"params[{k!r}] must list at least one value")
        out[str(k)] = v
    return out


class StaticExplorer:
    """Precomputed frames behind sliders, as self-contained HTML (``_repr_html_``)."""

    def __init__(self, frames: dict[tuple, bytes], params: dict[str, list], title: str = ""):
        self.frames, self.params, self.title = frames, params, title

    def to_html(self) -> str:
        names = list(self.params)
        uid = "dn" + hashlib.sha1((self.title + repr(self.params)).encode()).hexdigest()[:10]
        imgs = {",".join(str(i) for i in key): "data:image/png;base64," +
                base64.b64encode(png).decode() for key, png in self.frames.items()}
        first = ",".join("0" for _ in names)
        rows = []
        for j, n in enumerate(names):
            vals = self.params[n]
            rows.append(
                f'<div style="margin:2px 0"><label style="display:inline-block;min-width:8em">'
                f'{html.escape(n)}</label>'
                f'<input type="range" min="0" max="{len(vals) - 1}" value="0" step="1" '
                f'data-k="{j}" style="width:16em;vertical-align:middle"> '
                f'<span data-v="{j}">{html.escape(str(vals[0]))}</span></div>')
        labels = json.dumps([[str(v) for v in self.params[n]] for n in names])
        title = f"<div><b>{html.escape(self.title)}</b></div>" if self.title else ""
        return (
            f'<div id="{uid}" class="diffnotes-explorer" style="border:1px solid #ddd;'
            f'padding:6px;display:inline-block">{title}{"".join(rows)}'
            f'<img src="{imgs[first]}" style="max-width:100%;image-rendering:pixelated"></div>'
            f"<script>(function(){{var root=document.getElementById('{uid}');"
            f"var F={json.dumps(imgs)};var L={labels};"
            "var S=root.querySelectorAll('input[type=range]');"
            "function upd(){var k=[];S.forEach(function(s){var j=+s.dataset.k;k.push(s.value);"
            "root.querySelector('[data-v=\"'+j+'\"]').textContent=L[j][+s.value];});"
            "root.querySelector('img').src=F[k.join(',')];}"
            "S.forEach(function(s){s.addEventListener('input',upd);});})();</script>")

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str) -> None:
        """Write a standalone HTML page (for checking the twin in a browser)."""
        with open(path, "w") as f:
            f.write("<!doctype html><meta charset=utf-8><body>" + self.to_html() + "</body>")


def static_explorer(render: Callable, params: Mapping[str, Sequence], title: str = "",
                    dpi: int = 80, progress: bool = True) -> StaticExplorer:
    """Render every combination of ``params`` once and wrap the frames as a :class:`StaticExplorer`."""
    params = _check_params(params)
    names = list(params)
    keys = list(itertools.product(*[range(len(params[n])) for n in names]))
    frames = {}
    for key in tqdm(keys, disable=not progress, desc="rendering frames", leave=False):
        kw = {n: params[n][i] for n, i in zip(names, key)}
        frames[key] = to_png_bytes(render(**kw), dpi=dpi)
    return StaticExplorer(frames, params, title)


def explorer(render: Callable, params: Mapping[str, Sequence], title: str = "",
             live: bool | None = None, dpi: int = 80):
    """Live ipywidgets sliders in a kernel; the static twin when building the book.

    ``live=None`` decides with :func:`is_static`. Returns the widget or the
    :class:`StaticExplorer` (both display themselves in a notebook).
    """
    params = _check_params(params)
    if live is None:
        live = not is_static()
    if not live:
        return static_explorer(render, params, title, dpi=dpi, progress=False)  # no bar on pages
    import ipywidgets as W
    from IPython.display import Image, display

    cache: dict[tuple, bytes] = {}
    out = W.Output()
    sliders = {n: W.SelectionSlider(options=[(str(v), i) for i, v in enumerate(vals)],
                                    value=0, description=n, continuous_update=False)
               for n, vals in params.items()}

    def update(_=None):
        key = tuple(s.value for s in sliders.values())
        if key not in cache:
            cache[key] = to_png_bytes(render(**{n: params[n][i] for n, i in zip(params, key)}),
                                      dpi=dpi)
        out.clear_output(wait=True)
        with out:
            display(Image(cache[key]))

    for s in sliders.values():
        s.observe(update, names="value")
    update()
    return W.VBox(([W.HTML(f"<b>{html.escape(title)}</b>")] if title else [])
                  + list(sliders.values()) + [out])
