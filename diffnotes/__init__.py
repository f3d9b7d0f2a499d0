"""diffnotes: a runnable textbook on how diffusion models represent images.

Part I modules: :mod:`diffnotes.schedules`, :mod:`diffnotes.ddpm`, :mod:`diffnotes.ddim`,
:mod:`diffnotes.derive`, :mod:`diffnotes.guidance`. Models live in :mod:`diffnotes.models`.
"""
import os as _os

__version__ = "0.1.0"

if _os.environ.get("DIFFNOTES_STATIC") == "1":
    # Building the website: progress bars must not become Jupyter widgets (they would need the
    # widget JavaScript from a CDN). Text bars go to stderr, which the build drops; with
    # TQDM_DISABLE=1 (the build sets it) there are none at all, even where a caller passes
    # ``disable=False`` (tqdm's own TQDM_DISABLE only changes the default).
    import tqdm.auto as _auto
    import tqdm.std as _std

    class _BuildTqdm(_std.tqdm):
        def __init__(self, *args, **kwargs):
            if _os.environ.get("TQDM_DISABLE", "") not in ("", "0", "false", "False"):
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    _auto.tqdm = _BuildTqdm
    _auto.trange = lambda *args, **kwargs: _BuildTqdm(range(*args), **kwargs)
