"""The self-attention guidance explorer: the SAG scale and the blur σ.

Built on :func:`diffnotes.widgets.explorer` (live sliders in a kernel, a static twin with every
frame precomputed on the website). Each frame is one batched
:func:`diffnotes.guidance.sag_sample` run of a few prompts from fixed initial latents: the
samples, and under each the blur mask M of the middle step (Ahmad's notes, eq 5.57) with the
judged shape of the object.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..utils import check_range, check_tensor
from ._core import explorer

__all__ = ["sag_explorer", "sag_frame"]


def sag_frame(pipe, prompts: Sequence[str], latents: torch.Tensor, sag_scale: float,
              sigma: float, guidance_scale: float = 7.5, num_inference_steps: int = 10,
              shapes: Sequence[str] | None = None):
    """One frame: a matplotlib figure with the SAG samples of ``prompts`` (top row) and the
    mask of the middle step (bottom row); titles give the judged shape when ``shapes`` (the
    requested shape of each prompt) is given. Returns the figure."""
    import matplotlib.pyplot as plt

    from ..guidance import sag_sample
    from ..models import eval_shapes as ev

    seen = []
    ims = sag_sample(pipe, list(prompts), sag_scale=sag_scale, sigma=sigma,
                     guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                     latents=latents, callback=seen.append)
    mask = seen[len(seen) // 2]["mask"][:, 0].float().cpu().numpy()
    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(1.7 * n, 3.6), squeeze=False)
    clf = ev.shape_judge() if shapes is not None else None
    for j in range(n):
        axes[0, j].imshow(np.clip(ims[j], 0, 1))
        t = prompts[j] if shapes is None else \
            f"{shapes[j]} → {ev.judge_shape(ev.segment_object(ims[j]), clf)}"
        axes[0, j].set_title(t, fontsize=7)
        axes[1, j].imshow(mask[j], cmap="gray", vmin=0, vmax=1)
        axes[1, j].set_title(f"mask, {mask[j].mean():.0%} blurred", fontsize=7)
        for ax in axes[:, j]:
            ax.set_xticks([]); ax.set_yticks([])
    fig.suptitle(f"SAG scale {sag_scale:g}, blur σ {sigma:g} (CFG {guidance_scale:g})",
                 fontsize=8)
    fig.tight_layout()
    return fig


def sag_explorer(pipe, prompts: Sequence[str], latents: torch.Tensor,
                 scales: Sequence[float] = (0.0, 0.75, 2.0), sigmas: Sequence[float] = (1.0, 3.0),
                 guidance_scale: float = 7.5, num_inference_steps: int = 10,
                 shapes: Sequence[str] | None = None,
                 title: str = "Self-attention guidance: scale and blur", live: bool | None = None):
    """Sliders over the SAG scale and the blur σ (len(scales) × len(sigmas) frames: keep it
    ≲ 12) for ``prompts`` from ``latents`` (B, C, h, w). Raises ``ValueError`` for a negative
    scale, a σ ≤ 0, or latents of the wrong rank or batch."""
    scales = [check_range(s, "scales", 0) for s in scales]
    sigmas = [check_range(s, "sigmas", 0, lo_open=True) for s in sigmas]
    check_tensor(latents, "latents", ndim=4)
    if latents.shape[0] != len(prompts):
        raise ValueError(f"latents must have one row per prompt ({len(prompts)}), got "
                         f"{tuple(latents.shape)}")

    def frame(scale, sigma):
        return sag_frame(pipe, prompts, latents, scale, sigma, guidance_scale,
                         num_inference_steps, shapes)

    return explorer(frame, {"scale": scales, "sigma": sigmas}, title=title, live=live)
