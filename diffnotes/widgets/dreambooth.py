"""The Textual Inversion explorer: walk the placeholder's embedding from its initializer word to
the learned vector, d(α) = (1 − α) e_init + α d*, and see when the heart appears.

Built on :func:`diffnotes.widgets.explorer` (live slider in a kernel, a static twin with every
frame precomputed on the website). Each frame writes d(α) into the placeholder's row(s) of the
text encoder's embedding table, samples a few prompts from fixed seeds, titles each image with
the shape judge's verdict, and puts the learned rows back.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..utils import check_int, check_range
from ._core import explorer

__all__ = ["ti_frame", "ti_explorer"]


def ti_frame(pipe, result, prompts: Sequence[str], alpha: float, num_inference_steps: int = 10,
             guidance_scale: float = 4.0, seed: int = 0):
    """One frame: samples of ``prompts`` with the placeholder rows of ``result`` (a
    ``TextualInversionResult``) set to (1 − α)·initial + α·learned; a matplotlib figure."""
    import matplotlib.pyplot as plt

    from ..models import eval_shapes as ev

    table = pipe.text_encoder.get_input_embeddings().weight
    ids = result.token_ids
    with torch.no_grad():
        table[ids] = (1 - alpha) * result.initial + alpha * result.embeddings
        try:
            ims = pipe(list(prompts), num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="np",
                       generator=torch.Generator().manual_seed(seed)).images
        finally:
            table[ids] = result.embeddings
    clf = ev.shape_judge()
    n = len(prompts)
    fig, axes = plt.subplots(1, n, figsize=(1.7 * n, 2.0), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.imshow(np.clip(ims[j], 0, 1))
        ax.set_title(f"{prompts[j]}\n→ {ev.judge_shape(ev.segment_object(ims[j]), clf)}",
                     fontsize=6)
        ax.set_xticks([]); ax.set_yticks([])
    fig.suptitle(f"α = {alpha:g}: {1 - alpha:g}·e(initializer) + {alpha:g}·d*", fontsize=8)
    fig.tight_layout()
    return fig


def ti_explorer(pipe, result, prompts: Sequence[str], alphas: Sequence[float] = (0, 0.5, 1.0),
                num_inference_steps: int = 10, guidance_scale: float = 4.0, seed: int = 0,
                title: str = "Textual Inversion: from the initializer to the learned word",
                live: bool | None = None):
    """A slider over α ∈ ``alphas`` (each in [0, 1.5]; keep ≲ 5 frames) for ``prompts`` that use
    ``result.placeholder``. Raises ``ValueError`` naming ``alphas``, ``prompts`` or
    ``num_inference_steps``."""
    alphas = [check_range(a, "alphas", 0, 1.5) for a in alphas]
    num_inference_steps = check_int(num_inference_steps, "num_inference_steps", min=1)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")

    def frame(alpha):
        return ti_frame(pipe, result, prompts, alpha, num_inference_steps, guidance_scale, seed)

    return explorer(frame, {"alpha": alphas}, title=title, live=live)
