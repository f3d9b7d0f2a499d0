"""The Prompt-to-Prompt explorer: the cross-replace fraction τ against the kind of edit.

Built on :func:`diffnotes.widgets.explorer`: live sliders in a kernel, a static twin (every
frame precomputed) on the website. Each frame is one :func:`diffnotes.editing.p2p.prompt_to_prompt`
run from the same initial latent: the source image, the edited image, and their difference.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..utils import check_range, check_tensor
from ._core import explorer

__all__ = ["p2p_explorer", "pair_render"]


def pair_render(images: Sequence, labels: Sequence[str] = (), scale: int = 2, pad: int = 2,
                colors: int | None = 64):
    """One PIL image: ``images`` (PIL) side by side, upscaled ``scale``× with nearest-neighbour
    pixels, each with its (ASCII) label written above it; reduced to a palette of ``colors``
    colours (None: full RGB) so that the static twin's PNGs stay small."""
    from PIL import Image, ImageDraw

    ims = [im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST)
           for im in images]
    top = 12 if labels else 0
    w = sum(im.width for im in ims) + pad * (len(ims) - 1)
    h = max(im.height for im in ims) + top
    out = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for k, im in enumerate(ims):
        out.paste(im, (x, top))
        if k < len(labels):
            draw.text((x + 2, 0), str(labels[k]), fill=(0, 0, 0))
        x += im.width + pad
    return out.quantize(colors=colors) if colors else out


def p2p_explorer(pipe, edits: Mapping[str, tuple], latents: torch.Tensor,
                 taus: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                 num_inference_steps: int = 10, guidance_scale: float = 7.5,
                 self_replace_steps: float = 0.4, scale: int = 2,
                 title: str = "Prompt-to-Prompt: τ and the edit", live: bool | None = None):
    """Sliders over τ (``cross_replace_steps``) and the edit kind, from one initial latent.

    ``edits`` maps a name to ``(prompts, edit)`` or ``(prompts, edit, kwargs)`` (``prompts`` =
    [source, target], ``edit`` a :class:`~diffnotes.editing.p2p.WordSwap`, ``Refine`` or
    ``Reweight``; ``kwargs`` extra arguments of ``prompt_to_prompt``, e.g. ``local_blend``).
    Self-attention replacement is capped at τ (it never runs longer than the cross-attention
    injection), so τ = 0 is plain sampling of the target. A frame shows the source, the edit
    and |edit − source| (amplified 3×). Keep frames few (len(taus) × len(edits) ≲ 20) for a
    small static twin.

    Raises ``ValueError`` for a τ outside [0, 1], an empty ``edits`` or a latent of the wrong
    rank.
    """
    from PIL import Image
    import numpy as np

    from ..editing.p2p import prompt_to_prompt

    if not isinstance(edits, Mapping) or not edits:
        raise ValueError(f"edits must be a non-empty dict name -> (prompts, edit), got {edits!r}")
    taus = [check_range(t, "taus", 0, 1) for t in taus]
    check_tensor(latents, "latents", ndim=(3, 4))
    s_tau = check_range(self_replace_steps, "self_replace_steps", 0, 1)

    def frame(tau, edit):
        spec = edits[edit]
        prompts, ed = spec[0], spec[1]
        kw = dict(spec[2]) if len(spec) > 2 else {}
        ims, _ = prompt_to_prompt(pipe, prompts, ed, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, cross_replace_steps=tau,
                                  self_replace_steps=min(s_tau, tau), latents=latents, **kw)
        a, b = (np.asarray(im, dtype=np.float64) for im in ims[:2])
        diff = Image.fromarray(np.clip(np.abs(b - a) * 3, 0, 255).astype("uint8"))
        return pair_render([ims[0], ims[1], diff], ["source", f"edit, tau={tau:g}", "|diff| x3"],
                           scale=scale)

    return explorer(frame, {"tau": taus, "edit": list(edits)}, title=title, live=live)
