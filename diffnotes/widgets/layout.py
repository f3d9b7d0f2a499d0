"""The layout explorer: Dense Diffusion's modulation strength λ against the requested layout.

Built on :func:`diffnotes.widgets.explorer`: live sliders in a kernel, a static twin (every
frame precomputed) on the website. Each frame is one
:func:`diffnotes.editing.layout.dense_diffusion` run from the same initial latent, shown beside
the requested segments; λ = 0 is plain sampling of the prompt, so the first frame is the model
left to itself.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..utils import check_range, check_tensor
from ._core import explorer
from .p2p import pair_render

__all__ = ["layout_explorer", "segments_image"]


def segments_image(segments, size: int = 64, colors=None):
    """A PIL image of the requested segments: each mask painted in its object's colour (from the
    phrase's colour word when it names one of the shapes palette, else grey) on black."""
    from PIL import Image

    from ..data.shapes import COLORS

    img = np.zeros((size, size, 3))
    for phrase, mask in segments:
        m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)[None, None]
        m = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")[0, 0] > 0.5
        rgb = next((COLORS[w] for w in phrase.split() if w in COLORS), (0.6, 0.6, 0.6))
        img[m.numpy()] = 0.35 + 0.65 * np.asarray(rgb) * 0.7
    return Image.fromarray((img * 255).astype("uint8"))


def layout_explorer(pipe, layouts: Mapping[str, tuple], latents: torch.Tensor,
                    lams: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0),
                    num_inference_steps: int = 10, guidance_scale: float = 7.5,
                    lam_self_ratio: float = 0.3, window: float = 0.3, scale: int = 2,
                    title: str = "Dense Diffusion: the modulation strength and the layout",
                    live: bool | None = None):
    """Sliders over λ (Dense Diffusion's cross-attention weight w_c; self-attention gets
    ``lam_self_ratio`` · λ, the official 0.3) and the requested layout.

    ``layouts`` maps a name to ``(prompt, segments)`` (segments: a list of (phrase, mask) as
    :func:`~diffnotes.editing.layout.dense_diffusion` takes them). A frame shows the requested
    segments and the generated image. Keep frames few (len(lams) × len(layouts) ≲ 20).
    Raises ``ValueError`` for a negative λ, an empty ``layouts`` or a latent of the wrong rank.
    """
    from ..editing.layout import dense_diffusion

    if not isinstance(layouts, Mapping) or not layouts:
        raise ValueError(f"layouts must be a non-empty dict name -> (prompt, segments), got "
                         f"{layouts!r}")
    lams = [check_range(v, "lams", 0) for v in lams]
    check_tensor(latents, "latents", ndim=(3, 4))
    ratio = check_range(lam_self_ratio, "lam_self_ratio", 0)

    def frame(lam, layout):
        prompt, segs = layouts[layout]
        im = dense_diffusion(pipe, prompt, segs, lam=lam, lam_self=ratio * lam, window=window,
                             num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, latents=latents)[0]
        return pair_render([segments_image(segs, im.width), im],
                           ["requested", f"lambda={lam:g}"], scale=scale)

    return explorer(frame, {"lam": lams, "layout": list(layouts)}, title=title, live=live)
