"""The SDEdit explorer: the noise strength s (t₀ = s·T) and the mask, on one real image.

Built on :func:`diffnotes.widgets.explorer`: live sliders in a kernel, a static twin (every
frame precomputed) on the website. Each frame is :func:`diffnotes.editing.sdedit.sdedit` from
the same seed, shown beside the input, with the two figures of SDEdit's trade-off: faithfulness
(PSNR against the input outside the edited region) and realism of the edit (here: whether the
colour judge of :mod:`diffnotes.models.eval_shapes` finds the target colour inside the object).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..utils import check_range
from ._core import explorer

__all__ = ["sdedit_render", "sdedit_explorer"]


def _hwc(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def sdedit_render(pipe, image, prompt: str, mask=None, *, target_color: str | None = None,
                  num_inference_steps: int = 10, guidance_scale: float = 7.5, seed: int = 0,
                  size: float = 1.6) -> Callable:
    """A render function ``render(strength, masked) -> matplotlib figure`` for one image
    (HWC in [0, 1], 64 × 64 for the shapes model): the input and its SDEdit under ``prompt`` at
    ``strength`` (masked SDEdit inside ``mask`` when ``masked``; ``mask`` (H, W) bool is also
    where the faithfulness is not measured). ``target_color`` adds the colour judge's verdict
    inside ``mask`` to the title."""
    from ..editing.sdedit import sdedit
    from ..models.eval_shapes import judge_color

    src = np.asarray(image, dtype=np.float64)
    keep = np.ones(src.shape[:2], bool) if mask is None else ~np.asarray(mask, bool)

    def render(strength: float, masked: str):
        import matplotlib.pyplot as plt

        use_mask = masked == "on" and mask is not None
        out = sdedit(pipe, image, prompt, float(strength), mask=mask if use_mask else None,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                     generator=torch.Generator().manual_seed(seed))[0]
        x = _hwc(out)
        mse = float(((x - src) ** 2)[keep].mean())
        title = f"s = {strength}: PSNR outside {10 * np.log10(1 / max(mse, 1e-12)):.1f} dB"
        if target_color is not None and mask is not None:
            title += f", colour {judge_color(x, np.asarray(mask, bool))}"
        fig, axes = plt.subplots(1, 2, figsize=(2 * size, size + 0.35))
        for ax, im, t in zip(axes, (src, x), ("input", "SDEdit" + (" (masked)" if use_mask
                                                                  else ""))):
            ax.imshow(im.clip(0, 1), interpolation="nearest")
            ax.set_title(t, fontsize=7)
            ax.axis("off")
        fig.suptitle(title, fontsize=7)
        fig.tight_layout()
        return fig
    return render


def sdedit_explorer(pipe, image, prompt: str, mask=None, *,
                    strengths: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
                    target_color: str | None = None, num_inference_steps: int = 10,
                    guidance_scale: float = 7.5, seed: int = 0,
                    title: str = "SDEdit: strength and mask", live: bool | None = None):
    """Sliders over SDEdit's strength s ∈ (0, 1] and the mask (``"off"`` / ``"on"``; only
    ``"off"`` without a ``mask``). Frames are few (len(strengths) × 2) and small, so the static
    twin stays light. Raises ``ValueError`` naming ``strengths`` for a value outside (0, 1]."""
    strengths = [check_range(s, "strengths", 0.0, 1.0, lo_open=True) for s in strengths]
    if not strengths:
        raise ValueError("strengths must hold at least one value in (0, 1], got none")
    render = sdedit_render(pipe, image, prompt, mask, target_color=target_color,
                           num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, seed=seed)
    return explorer(render, {"strength": strengths,
                             "masked": ["off", "on"] if mask is not None else ["off"]},
                    title=title, live=live)
