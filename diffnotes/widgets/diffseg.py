"""The DiffSeg explorer: the KL merging threshold τ.

Built on :func:`diffnotes.widgets.explorer` (live slider in a kernel, a static twin with every
frame precomputed on the website). The aggregated attention tensors A_f of a few images are
computed once by the caller (:func:`diffnotes.recognition.diffseg.aggregate_attention`); each
frame merges them with one threshold (:func:`~diffnotes.recognition.diffseg.merge_attention`,
three iterations, optional k-means refinement) and shows the label maps under the images and,
when given, the true masks, with the number of segments and the per-image Hungarian-matched
mIoU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..utils import check_choice, check_range
from ._core import explorer

__all__ = ["diffseg_explorer", "diffseg_frame"]


def diffseg_frame(attn: Sequence[torch.Tensor], images, tau: float, truth=None,
                  kl_convention: str = "code", refine: bool = True, num_points: int = 8,
                  num_classes: int = 6):
    """One frame (a matplotlib figure): DiffSeg label maps of the images whose aggregated
    attention (P, P) is ``attn``, with threshold ``tau`` (three merging iterations)."""
    import matplotlib.pyplot as plt

    from ..recognition import diffseg as ds

    images = np.asarray(images)
    rows = 3 if truth is not None else 2
    n = len(attn)
    fig, ax = plt.subplots(rows, n, figsize=(1.5 * n, 1.55 * rows), squeeze=False)
    scores = []
    for j, A in enumerate(attn):
        R = int(round(A.shape[0] ** 0.5))
        props = ds.merge_attention(A, ds.anchor_grid(min(num_points, R), R), (tau,) * 3,
                                   kl_convention)
        if refine:
            props = ds.refine_kmeans(A, props)
        lab = ds.label_map(props, images.shape[1])
        _, lab = torch.unique(lab, return_inverse=True)
        lab = lab.numpy()
        ax[0, j].imshow(images[j])
        ax[-1, j].imshow(lab % 10, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        title = f"{int(lab.max()) + 1} segments"
        if truth is not None:
            from ..recognition.eval_segmentation import matched_miou_per_image

            ax[1, j].imshow(np.asarray(truth[j]) % 10, cmap="tab10", vmin=0, vmax=9,
                            interpolation="nearest")
            m = matched_miou_per_image([lab], [np.asarray(truth[j])], num_classes)[0]
            scores.append(m)
            title += f"\nmIoU {m:.2f}"
        ax[-1, j].set_title(title, fontsize=7)
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    ax[0, 0].set_ylabel("image", fontsize=8)
    if truth is not None:
        ax[1, 0].set_ylabel("truth", fontsize=8)
    ax[-1, 0].set_ylabel("DiffSeg", fontsize=8)
    fig.suptitle(f"τ = {tau:g} ({kl_convention} KL convention)", fontsize=9)
    fig.tight_layout()
    return fig


def diffseg_explorer(attn: Sequence[torch.Tensor], images, taus: Sequence[float] = (
        0.003, 0.006, 0.01, 0.02, 0.05, 0.9), truth=None, kl_convention: str = "code",
        refine: bool = True, num_points: int = 8, title: str = "DiffSeg: the KL threshold τ",
        live: bool | None = None):
    """A slider over DiffSeg's KL threshold τ (one frame per value) on precomputed aggregated
    attention tensors ``attn`` of ``images`` (n, H, W, 3) in [0, 1], with optional true label
    maps ``truth`` (n, H, W). Raises ``ValueError`` for a non-positive τ, an unknown KL
    convention or mismatched lengths."""
    taus = [check_range(t, "taus", 0, lo_open=True) for t in taus]
    if not taus:
        raise ValueError("taus must list at least one threshold, got none")
    check_choice(kl_convention, "kl_convention", ("paper", "code"))
    attn = list(attn)
    if len(attn) != len(images) or (truth is not None and len(truth) != len(attn)):
        raise ValueError(f"attn, images (and truth) must have the same length, got {len(attn)}, "
                         f"{len(images)}" + ("" if truth is None else f", {len(truth)}"))

    def render(tau):
        return diffseg_frame(attn, images, tau, truth, kl_convention, refine, num_points)

    return explorer(render, {"tau": taus}, title=title, live=live)
