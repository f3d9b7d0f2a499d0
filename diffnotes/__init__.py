"""diffnotes: a runnable textbook on how diffusion models represent images.

Part I modules: :mod:`diffnotes.schedules`, :mod:`diffnotes.ddpm`, :mod:`diffnotes.ddim`,
:mod:`diffnotes.derive`, :mod:`diffnotes.guidance`. Models live in :mod:`diffnotes.models`.
"""
import os as _os

__version__ = "0.1.0"

if _os.environ.get("DIFFNOTES_STATIC") == "1":
    # Building the website: progress bars must not become Jupyter widgets (they would need the
    # widget JavaScript from a CDN). Text bars go to stderr, which the build drops.
    import tqdm.auto as _auto
    import tqdm.std as _std

    _auto.tqdm = _std.tqdm
    _auto.trange = _std.trange
