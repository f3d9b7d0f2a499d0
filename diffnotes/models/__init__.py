"""Models, from exact to real: the analytic mixture, toy networks, shipped small models, and
(on a GPU) Stable Diffusion.

``diffnotes.models.load_pipeline(name)`` is :func:`diffnotes.models.load.load_pipeline`
(imported on first use: it pulls in diffusers).
"""


def __getattr__(name):
    if name == "load_pipeline":
        from .load import load_pipeline
        return load_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
