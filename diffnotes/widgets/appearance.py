"""The appearance-transfer explorer: Cross-Image Attention's contrast β, with and without AdaIN.

Built on :func:`diffnotes.widgets.explorer`: live sliders in a kernel, a static twin (every frame
precomputed) on the website. Each frame is one
:func:`diffnotes.editing.appearance.cross_image_attention` run on the same structure and
appearance images: the two inputs and the output, side by side.
"""
from __future__ import annotations

from typing import Sequence

from ..utils import check_range
from ._core import explorer
from .p2p import pair_render

__all__ = ["appearance_explorer"]


def appearance_explorer(pipe, structure, appearance, contrasts: Sequence[float] = (1.0, 1.67, 3.0),
                        adain: Sequence[bool] = (True, False), num_inference_steps: int = 10,
                        scale: int = 2, title: str = "Cross-Image Attention: contrast and AdaIN",
                        live: bool | None = None, **kwargs):
    """Sliders over the contrast β (``contrast``) and AdaIN on/off. ``structure``,
    ``appearance``: images of the model's size (see
    :func:`~diffnotes.editing.appearance.cross_image_attention`); ``kwargs`` go to it. Keep
    ``len(contrasts) × len(adain)`` ≲ 20 frames. Raises ``ValueError`` for β ≤ 0."""
    from PIL import Image
    import numpy as np

    from ..editing.appearance import cross_image_attention

    contrasts = [check_range(c, "contrasts", 0, None, lo_open=True) for c in contrasts]
    adain = [bool(a) for a in adain]
    if not contrasts or not adain:
        raise ValueError("contrasts and adain must be non-empty")

    def pil(im):
        if isinstance(im, Image.Image):
            return im
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype("uint8"))

    def frame(contrast, adain):
        out = cross_image_attention(pipe, structure, appearance, contrast=contrast, adain=adain,
                                    num_inference_steps=num_inference_steps, **kwargs)
        label = f"b={contrast:g}, AdaIN {'on' if adain else 'off'}"
        return pair_render([pil(structure), pil(appearance), out],
                           ["structure", "appearance", label], scale=scale)

    return explorer(frame, {"contrast": contrasts, "adain": adain}, title=title, live=live)
